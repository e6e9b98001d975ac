"""ONNX Runtime next to the PyTorch student: :func:`verify_onnx` runs both on the same batches
and reports how often they agree (the file is written by
:func:`granq_search.export.onnx_export.export_onnx`).

Agreement
---------

ONNX Runtime's convolutions and BatchNorm round in another order than PyTorch's, so values
differ by an ulp or so. Now and then that moves a value across a rounding boundary of a 3-4 bit
quantizer; the changed activation (one quantization step) propagates and moves further values
downstream. Deep low-bit students therefore agree with their ONNX export on most, not all,
top-1 decisions, with logit differences far above float precision; PyTorch shows the same
effect against itself when only its convolution backend changes (measured in the benchmark).
:func:`verify_onnx` reports the agreement; the small digits model agrees on every image.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granq_search.errors import GranqError
from granq_search.export.onnx_export import INPUT_NAME, OUTPUT_NAME, require_onnx

__all__ = ["verify_onnx"]


def _session(path: str | Path, threads: int | None, config: Mapping[str, str] | None = None):
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(str(key), str(value))
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


@torch.no_grad()
def verify_onnx(onnx_path: str | Path, student: nn.Module, data: Iterable, *, max_batches: int | None = None,
                threads: int | None = None, session_config: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ONNX Runtime (CPUExecutionProvider) and the PyTorch ``student`` on the same batches.

    ``data`` yields ``(images, labels)`` batches (an evaluation loader) or image tensors.
    Returns ``n`` (images), ``batches``, ``agreement`` (% of images with the same top-1 class),
    ``onnx_top1`` / ``torch_top1`` (accuracy %, None without labels), ``top1_diff`` (points,
    ONNX minus PyTorch), ``max_abs_diff`` (largest |logit difference|) and ``mean_abs_diff``.
    The student runs in eval mode (its train/eval state is restored afterwards). ``threads``:
    ONNX Runtime intra-op threads; ``session_config``: ONNX Runtime session config entries, e.g.
    ``{"session.disable_quant_qdq": "1"}`` (dequantize the weights once at load time).

    Agreement is a statistical figure for deep low-bit networks: a float difference of one ulp
    (another convolution algorithm, BatchNorm arithmetic) moves a value across a quantizer's
    rounding boundary now and then, and the changed activation propagates; PyTorch itself
    shows the same effect between its own convolution backends.
    """
    sess = _session(onnx_path, threads, session_config)
    modes = {m: m.training for m in student.modules()}
    student.eval()
    try:
        device = next(iter(student.parameters())).device
    except StopIteration:
        device = torch.device("cpu")
    n = agree = hits_onnx = hits_torch = labelled = batches = 0
    max_abs, sum_abs, count = 0.0, 0.0, 0
    try:
        for batch in data:
            if max_batches is not None and batches >= max_batches:
                break
            x, y = _split(batch)
            x = x.detach().to(torch.float32).cpu()
            ref = student(x.to(device)).detach().float().cpu()
            out = torch.from_numpy(sess.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0])
            if out.shape != ref.shape:
                raise GranqError(f"ONNX output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)}")
            diff = (out - ref).abs()
            max_abs = max(max_abs, float(diff.max())) if diff.numel() else max_abs
            sum_abs += float(diff.sum())
            count += diff.numel()
            p_onnx, p_torch = out.argmax(1), ref.argmax(1)
            agree += int((p_onnx == p_torch).sum())
            if y is not None:
                y = y.cpu()
                hits_onnx += int((p_onnx == y).sum())
                hits_torch += int((p_torch == y).sum())
                labelled += int(y.shape[0])
            n += int(x.shape[0])
            batches += 1
    finally:
        for m, t in modes.items():
            m.training = t
    if n == 0:
        raise GranqError("verify_onnx got no data to compare on")
    onnx_top1 = 100.0 * hits_onnx / labelled if labelled else None
    torch_top1 = 100.0 * hits_torch / labelled if labelled else None
    return {
        "n": n,
        "batches": batches,
        "agreement": 100.0 * agree / n,
        "onnx_top1": onnx_top1,
        "torch_top1": torch_top1,
        "top1_diff": (onnx_top1 - torch_top1) if labelled else None,
        "max_abs_diff": max_abs,
        "mean_abs_diff": sum_abs / max(count, 1),
    }
