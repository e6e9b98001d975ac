"""``prepare``: turn a float model into a quantized student.

The student is a new module (the input model is deep-copied and never touched):

* every ``nn.Conv2d`` / ``nn.Linear`` becomes a :class:`QuantConv2d` / :class:`QuantLinear`
  under the same name, sharing nothing with the input model but keeping the parameter names,
  so the float model's state dict loads into the student (:func:`load_float_state_dict`);
* every ReLU / ReLU6 **call site** gets its own :class:`ActQuantizer` right after it. Call
  sites are found by ``torch.fx`` symbolic tracing (Conv2d, Linear and activation modules
  are kept as leaves, subclasses included): calls of ``nn.ReLU`` / ``nn.ReLU6`` /
  ``nn.Hardtanh(0, 6)`` modules (one module called twice is two sites), ``F.relu``,
  ``torch.relu``, ``F.relu6``, ``F.hardtanh(x, 0, 6)`` (and their in-place forms), and the
  tensor methods ``x.relu()`` / ``x.relu_()``. After an in-place call, later uses of its input
  read the quantized activation too.

Site names are readable and deterministic: the module's qualified name for module calls
(``layer1.0.relu``), the enclosing module's name plus the function for functional calls
(``layer1.0.relu`` for an ``F.relu`` inside ``layer1.0``), with ``#k`` appended for the k-th
further site of the same name in graph order (``layer1.0.relu#1``). The quantizers live in the
ModuleDict ``act_quantizers`` under the name with every character that is not a letter, digit
or ``_`` replaced by ``_`` (``act_quantizers.layer1_0_relu_1``).

Overrides (``quant_cfg.overrides``) are applied in order, later ones winning for each field
they set; patterns use ``fnmatch`` (case-sensitive):

* a Conv2d / Linear matches on its module name (``conv1``, ``layer3.*``);
* an activation site matches on its site name, or on the name of the layer producing its
  input (the first Conv2d / Linear reached by following first inputs back through the graph,
  e.g. ``layer1.0.conv2`` for ``relu(bn2(conv2(x)) + shortcut)``), so ``conv1`` with
  ``act_bits: 8`` also sets the activation after ``conv1``;
* ``quantize: false`` leaves matching layers in float (not replaced) and matching sites
  unquantized (the quantizer is kept, switched off, and reported as ``none (float)``).

A forward that calls ``F.conv2d`` / ``F.linear`` itself, or a Conv2d / Linear subclass with
its own ``forward``, is refused with :class:`ModelError` rather than silently left in float.
The input image is never quantized. The student is an ``fx.GraphModule``; modules and tensors
of the input model that its forward does not use are carried over too, so the state-dict keys
are those of the float model plus the quantizer buffers.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from granq_search.config import QuantConfig
from granq_search.errors import CheckpointError, ModelError
from granq_search.quant.modules import ActQuantizer, ActSpec, QuantConv2d, QuantLinear, WeightSpec

__all__ = ["prepare", "load_float_state_dict", "act_quantizers", "passthrough", "ACT_CONTAINER"]

ACT_CONTAINER = "act_quantizers"
"""Name of the ModuleDict holding the activation quantizers of a prepared student."""

_RELU_FUNCS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
}
_INPLACE_FUNCS = {torch.relu_}
_HARDTANH_FUNCS = {F.hardtanh: False, F.hardtanh_: True}
_RELU_METHODS = {"relu": False, "relu_": True}


def act_quantizers(model: nn.Module) -> list[tuple[str, ActQuantizer]]:
    """``(site name, quantizer)`` for every activation quantizer of ``model``, in graph order."""
    return [(q.site or name, q) for name, q in model.named_modules() if isinstance(q, ActQuantizer)]


@contextlib.contextmanager
def passthrough(model: nn.Module) -> Iterator[None]:
    """Temporarily make every activation quantizer of ``model`` return its input unchanged."""
    qs = [q for _, q in act_quantizers(model)]
    before = [q._passthrough for q in qs]
    for q in qs:
        q._passthrough = True
    try:
        yield
    finally:
        for q, b in zip(qs, before):
            q._passthrough = b


# --------------------------------------------------------------------------- site discovery


def _is_act_module(m: nn.Module) -> bool:
    if isinstance(m, nn.ReLU):
        return True
    return isinstance(m, nn.Hardtanh) and float(m.min_val) == 0.0 and float(m.max_val) == 6.0


def _arg(node: fx.Node, pos: int, name: str, default: Any) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _site_kind(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str, bool] | None:
    """``(base function name, in-place)`` when ``node`` is a ReLU/ReLU6 call site, else None."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        if m is not None and _is_act_module(m):
            return "", bool(getattr(m, "inplace", False))
    elif node.op == "call_function":
        if node.target in _RELU_FUNCS:
            inplace = node.target in _INPLACE_FUNCS or bool(_arg(node, 1, "inplace", False))
            return _RELU_FUNCS[node.target], inplace
        if node.target in _HARDTANH_FUNCS:
            lo, hi = _arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)
            if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo == 0 and hi == 6:
                inplace = _HARDTANH_FUNCS[node.target] or bool(_arg(node, 3, "inplace", False))
                return "hardtanh", inplace
    elif node.op == "call_method" and node.target in _RELU_METHODS:
        return "relu", _RELU_METHODS[str(node.target)]
    return None


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    return str(last[0]) if isinstance(last, tuple) else str(last)


def _producer(node: fx.Node, modules: Mapping[str, nn.Module]) -> str | None:
    """The first Conv2d/Linear reached by following first inputs back from ``node``'s input."""
    cur: Any = node.args[0] if node.args else None
    for _ in range(10_000):
        if not isinstance(cur, fx.Node) or cur.op in ("placeholder", "get_attr"):
            return None
        if cur.op == "call_module" and isinstance(modules.get(str(cur.target)), (nn.Conv2d, nn.Linear)):
            return str(cur.target)
        nodes = [a for a in cur.args if isinstance(a, fx.Node)]
        cur = nodes[0] if nodes else None
    return None


def _key(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9A-Za-z_]", "_", name) or "site"
    key, k = base, 1
    while key in taken:
        k += 1
        key = f"{base}_{k}"
    taken.add(key)
    return key


# --------------------------------------------------------------------------- specs from the config


def _weight_spec(cfg: QuantConfig, name: str) -> tuple[WeightSpec, bool]:
    bits, gran, enabled = cfg.weight.bits, cfg.weight.granularity, True
    for o in cfg.overrides:
        if fnmatchcase(name, o.pattern):
            enabled = enabled and o.quantize
            bits = o.weight_bits if o.weight_bits is not None else bits
            gran = o.weight_granularity if o.weight_granularity is not None else gran
    return WeightSpec(bits, gran, cfg.weight.symmetric), enabled


def _act_spec(cfg: QuantConfig, site: str, producer: str | None, bits: int | None = None) -> ActSpec:
    a = cfg.act
    bits, gran, enabled = (a.bits if bits is None else bits), a.granularity, True
    for o in cfg.overrides:
        if fnmatchcase(site, o.pattern) or (producer is not None and fnmatchcase(producer, o.pattern)):
            enabled = enabled and o.quantize
            bits = o.act_bits if o.act_bits is not None else bits
            gran = o.act_granularity if o.act_granularity is not None else gran
    return ActSpec(bits, gran, a.threshold, a.range_mode, enabled)


# --------------------------------------------------------------------------- prepare


class _Tracer(fx.Tracer):
    """Keeps every Conv2d / Linear and activation module a leaf, also subclasses defined
    outside ``torch.nn`` (which the default tracer would trace through and lose)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear)) or _is_act_module(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


_FUNCTIONAL_LAYERS = {F.conv2d, torch.conv2d, F.linear}


def _trace(root: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(root)
    name = root.__class__.__name__
    return fx.GraphModule(root, graph, name)


def _carry_untraced(src: nn.Module, gm: fx.GraphModule) -> None:
    """Attach the modules, parameters and buffers of ``src`` that tracing left out."""
    for name, mod in src.named_modules():
        try:
            target = gm.get_submodule(name) if name else gm
        except AttributeError:
            parent_name, _, leaf = name.rpartition(".")
            gm.get_submodule(parent_name).add_module(leaf, mod)
            continue
        if target is mod:
            continue
        for pname, p in mod._parameters.items():
            if pname not in target._parameters and pname not in target._modules and not hasattr(target, pname):
                target.register_parameter(pname, p)
        for bname, b in mod._buffers.items():
            if bname not in target._buffers and not hasattr(target, bname):
                target.register_buffer(bname, b, persistent=bname not in mod._non_persistent_buffers_set)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def _check_plain(m: nn.Module, base: type, name: str, model: nn.Module) -> None:
    if type(m).forward is not base.forward:
        raise ModelError(f"{type(model).__name__}: layer '{name}' is a {type(m).__name__} with its own forward, "
                         f"which the quantizer cannot wrap; use a plain {base.__name__}")


def _insert_input_sites(graph: fx.Graph, modules: Mapping[str, nn.Module], quant_cfg: QuantConfig,
                        container: nn.ModuleDict, site_device: torch.device, counts: dict[str, int],
                        taken: set[str]) -> None:
    """Placement ``layer_input``: a quantizer on the input of every Conv2d / Linear call whose
    input comes from another layer (the first layer reads the image, which is never quantized).
    Each call gets its own quantizer, site ``<layer>.input`` (``#k`` for further calls)."""
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), (nn.Conv2d, nn.Linear)):
            continue
        inp = node.args[0] if node.args else None
        producer = _producer(node, modules)
        if not isinstance(inp, fx.Node) or producer is None:
            continue
        base = f"{node.target}.input"
        k = counts.get(base, 0)
        counts[base] = k + 1
        site = base if k == 0 else f"{base}#{k}"
        key = _key(site, taken)
        spec = _act_spec(quant_cfg, site, producer)
        container[key] = ActQuantizer.from_spec(spec, site=site, producer=producer, role="layer_input").to(site_device)
        with graph.inserting_before(node):
            qnode = graph.call_module(f"{ACT_CONTAINER}.{key}", args=(inp,))
        node.replace_input_with(inp, qnode)


def prepare(model: nn.Module, quant_cfg: QuantConfig, example_input: torch.Tensor | None = None) -> fx.GraphModule:
    """A quantized copy of ``model`` (see the module docstring); ``model`` is left untouched.

    ``example_input``, when given, is run once (eval mode, no grad, activation quantizers
    passing through) to check that the student runs and to record each site's input shape.
    Raises :class:`ModelError` when ``torch.fx`` cannot trace ``model``.
    """
    if not isinstance(quant_cfg, QuantConfig):
        raise TypeError(f"quant_cfg must be a QuantConfig, got {type(quant_cfg).__name__}")
    cls = type(model).__name__
    src = copy.deepcopy(model)
    try:
        gm = _trace(src)
    except Exception as e:  # tracing fails in many ways (control flow, unsupported ops, ...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"cannot quantize {cls}: torch.fx cannot trace its forward ({reason}); "
                         "remove data-dependent control flow from forward") from None
    gm.training = src.training
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            fn = getattr(node.target, "__name__", str(node.target))
            raise ModelError(f"cannot quantize {cls}: its forward calls {fn} directly, whose weights would stay "
                             "in float; use nn.Conv2d / nn.Linear modules")
    _carry_untraced(src, gm)
    if hasattr(gm, ACT_CONTAINER):
        raise ModelError(f"cannot quantize {cls}: it already has an attribute '{ACT_CONTAINER}'")
    container = nn.ModuleDict()
    gm.add_module(ACT_CONTAINER, container)
    home = next(iter(src.parameters()), None)
    if home is None:
        home = next(iter(src.buffers()), None)
    site_device = home.device if home is not None else torch.device("cpu")

    modules = dict(gm.named_modules(remove_duplicate=False))
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    counts: dict[str, int] = {}
    taken: set[str] = set()
    placement, residual_bits = quant_cfg.act.placement, quant_cfg.act.residual_bits
    if placement == "layer_input":
        _insert_input_sites(graph, modules, quant_cfg, container, site_device, counts, taken)
    for node in list(graph.nodes):
        kind = _site_kind(node, modules)
        if kind is None:
            continue
        if placement == "layer_input" and residual_bits is None:
            continue  # the ReLU outputs (the residual stream) stay in float
        fn, inplace = kind
        if node.op == "call_module":
            base = str(node.target)
        else:
            scope = _scope(node)
            base = f"{scope}.{fn}" if scope else fn
        k = counts.get(base, 0)
        counts[base] = k + 1
        site = base if k == 0 else f"{base}#{k}"
        producer = _producer(node, modules)
        key = _key(site, taken)
        role = "residual" if placement == "layer_input" else "relu_output"
        spec = _act_spec(quant_cfg, site, producer, bits=residual_bits if role == "residual" else None)
        quantizer = ActQuantizer.from_spec(spec, site=site, producer=producer, role=role)
        container[key] = quantizer.to(site_device)
        with graph.inserting_after(node):
            qnode = graph.call_module(f"{ACT_CONTAINER}.{key}", args=(node,))
        node.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        inp = node.args[0] if node.args else None
        if inplace and isinstance(inp, fx.Node):  # later readers of the input see relu(x) too
            for user in list(inp.users):
                if user in order and order[user] > order[node]:
                    user.replace_input_with(inp, qnode)

    replaced: dict[int, nn.Module] = {}
    for name, m in list(gm.named_modules(remove_duplicate=False)):
        if isinstance(m, (QuantConv2d, QuantLinear)):
            continue
        if id(m) in replaced:
            _set_submodule(gm, name, replaced[id(m)])
            continue
        if isinstance(m, nn.Conv2d):
            _check_plain(m, nn.Conv2d, name, model)
            spec, enabled = _weight_spec(quant_cfg, name)
            if enabled:
                replaced[id(m)] = QuantConv2d.from_float(m, spec)
        elif isinstance(m, nn.Linear):
            _check_plain(m, nn.Linear, name, model)
            spec, enabled = _weight_spec(quant_cfg, name)
            if enabled:
                replaced[id(m)] = QuantLinear.from_float(m, spec)
        if id(m) in replaced:
            _set_submodule(gm, name, replaced[id(m)])

    graph.lint()
    gm.recompile()
    if example_input is not None:
        _dry_run(gm, example_input, cls)
    return gm


def _dry_run(student: nn.Module, example_input: torch.Tensor, cls: str) -> None:
    modes = {m: m.training for m in student.modules()}
    student.eval()
    try:
        with torch.no_grad(), passthrough(student):
            student(example_input)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelError(f"the quantized {cls} does not run on an input of shape {tuple(example_input.shape)} "
                         f"({reason}); check the model's image size and channels") from None
    finally:
        for m, t in modes.items():
            m.training = t


def load_float_state_dict(student: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load a float model's state dict into its prepared student.

    Every key of ``state_dict`` must exist in the student and every student key must be in
    ``state_dict``, except the activation quantizers' buffers (left as they are).
    Raises :class:`CheckpointError` otherwise, naming the first offending keys.
    """
    quant_keys = {f"{name}.{b}" for name, m in student.named_modules() if isinstance(m, ActQuantizer)
                  for b in m._buffers}
    try:
        result = student.load_state_dict(dict(state_dict), strict=False)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "shape mismatch")
        raise CheckpointError(f"float state dict does not fit the quantized model: {detail[:200]}") from None
    missing = [k for k in result.missing_keys if k not in quant_keys]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if result.unexpected_keys:
            unexp = result.unexpected_keys
            parts.append(f"unexpected {', '.join(unexp[:3])}" + (" ..." if len(unexp) > 3 else ""))
        raise CheckpointError(f"float state dict does not fit the quantized model: {'; '.join(parts)}; "
                              "was it saved from the same architecture?")
