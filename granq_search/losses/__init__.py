"""Pure loss functions of the GranQ pipeline (GRANQ.md section 3) and the teacher BN recorder.

Generator step::

    with bn_stats_recorder(teacher) as rec:
        z_t = teacher(images)
    z_s = student(images)
    loss, parts = generator_loss(z_t, z_s, y, bns_loss(rec.stats), cfg.loss)

Student step (detached images): ``student_loss(z_t, z_s, cfg.loss)``.
"""

from granq_search.losses.bn_stats import BNStat, BNStatsHook, batch_stats, bn_stats_recorder, bns_loss
from granq_search.losses.objectives import (
    MARGIN_EPS,
    disagreement_agreement_loss,
    entropy_student_loss,
    generator_loss,
    kl_student_loss,
    margin_loss,
    normalized_entropy,
    softmax_entropy,
    student_loss,
)

__all__ = [
    "BNStat",
    "BNStatsHook",
    "bn_stats_recorder",
    "batch_stats",
    "bns_loss",
    "MARGIN_EPS",
    "softmax_entropy",
    "normalized_entropy",
    "margin_loss",
    "disagreement_agreement_loss",
    "generator_loss",
    "entropy_student_loss",
    "kl_student_loss",
    "student_loss",
]
