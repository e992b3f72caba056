"""RDCD training losses, the FIFO feature queues they read, and two diagnostics.

Each loss is a small pure function you can read next to its equation in docs/method.md:

    L_con  MoCo-v2 InfoNCE of the student descriptor z_S against its momentum key z_S' (positive)
           and a queue of past keys (negatives)                              -> contrastive_loss
    L_hn   -log(1 - largest cosine between z_S and any queued key)           -> hard_negative_loss
    L_rel  KL(p_T || p_S) of teacher / student similarity distributions over
           a queue of past teacher features                                  -> relational_loss
    L    = lambda_con * (L_con + lambda_hn * L_hn) + lambda_rel * L_rel      -> RDCDLoss

RDCDLoss owns the two queues as registered buffers, so a checkpoint of the module holds them.
Computing the losses never changes a queue: the training step calls ``RDCDLoss.enqueue`` afterwards
with the keys and teacher features gathered from all processes (gathering is the caller's job).

Same-image keys. Each queued key remembers which training image it came from. On a small
training set (thousands of images, a queue of thousands of keys) most queries meet an earlier view
of their own image in the queue; counting that copy as a negative would teach the opposite of copy
detection, and it would often be L_hn's hardest negative. So rows of the query's own image are
masked out of L_con's negatives and L_hn's max (``mask_same_image``, on by default; the paper's
1M-image scale never meets the case). L_rel's teacher bank keeps them by default: there the
teacher's own similarity to an earlier view is a target like any other, not a negative label
(``rel_mask_same_image`` removes them too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    """FIFO queue of ``size`` feature vectors of dimension ``dim``, held in registered buffers.

    Buffers (all saved in ``state_dict``): ``queue`` (size, dim), ``ptr`` (the row the next key is
    written to) and ``num_filled`` (how many rows hold enqueued features, at most ``size``).

    ``random_init=True`` (MoCo, used for the key queue): rows start as random unit vectors and every
    row is used from the first step on. ``random_init=False`` (the teacher-feature queue): rows
    start as zeros and only filled rows are returned by ``features()``; rows fill in order from
    row 0, so the filled rows are always ``queue[:num_filled]``.

    ``enqueue`` overwrites the oldest rows, wrapping around the end of the buffer, so the queue size
    need not be a multiple of the batch size; a batch larger than the queue keeps its last ``size``
    rows. ``ids`` (size,) holds the training-image index of each row, -1 for rows no image wrote.
    """

    def __init__(self, size: int, dim: int, random_init: bool = True):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be positive, got size={size}, dim={dim}")
        self.random_init = random_init
        initial = F.normalize(torch.randn(size, dim), dim=1) if random_init else torch.zeros(size, dim)
        self.register_buffer("queue", initial)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the queue stored image ids: no row has a known image
        state_dict.setdefault(prefix + "ids", torch.full((self.size,), -1, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def features(self) -> Tensor:
        """The rows a loss should read: all of them (random init) or only the filled ones."""
        if self.random_init:
            return self.queue
        return self.queue[: int(self.num_filled)]

    def feature_ids(self) -> Tensor:
        """The image index of each row ``features()`` returns (-1: unknown)."""
        if self.random_init:
            return self.ids
        return self.ids[: int(self.num_filled)]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, ids: Tensor | None = None) -> None:
        """Write ``keys`` (n, dim) over the oldest rows, with their image indices ``ids`` (n,) (None:
        unknown, -1); the keys are detached."""
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"expected keys of shape (n, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        if ids is not None and ids.shape != keys.shape[:1]:
            raise ValueError(f"expected one image id per key ({keys.shape[0]}), got shape {tuple(ids.shape)}")
        keys = keys.detach()[-self.size :].to(self.queue.dtype)
        n = keys.shape[0]
        rows = (self.ptr + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[rows] = keys
        self.ids[rows] = -1 if ids is None else ids[-self.size :].to(self.ids)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.num_filled.copy_(torch.clamp(self.num_filled + n, max=self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.queue.shape[1]}, random_init={self.random_init}"


def same_image_mask(query_ids: Tensor | None, queue_ids: Tensor | None) -> Tensor | None:
    """(B, K) True where queue row j holds a view of query i's own image (ids >= 0 only); None when
    either side has no ids."""
    if query_ids is None or queue_ids is None:
        return None
    return (query_ids[:, None] == queue_ids[None, :]) & (queue_ids[None, :] >= 0)


def contrastive_loss(q: Tensor, k: Tensor, queue: Tensor, tau: float = 0.07, exclude: Tensor | None = None) -> Tensor:
    """MoCo InfoNCE. q, k: (B, d) unit vectors (k is the positive of q); queue: (K, d) unit negatives.

    logits = [q.k, q.queue^T] / tau, cross-entropy with the positive at index 0. No in-batch
    negatives. Keys and queue are constants (detached), as in MoCo. ``exclude`` (B, K): queue rows
    that are not negatives of that query (views of its own image), left out of its softmax.
    """
    positive = (q * k.detach()).sum(dim=1, keepdim=True)  # (B, 1)
    negatives = q @ queue.detach().T  # (B, K)
    if exclude is not None:
        negatives = negatives.masked_fill(exclude, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / tau
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def hard_negative_loss(q: Tensor, queue: Tensor, eps: float = 1e-3, exclude: Tensor | None = None) -> Tensor:
    """Mean over the batch of -log(max(1 - s_max, eps)), s_max = largest cosine of q to a queue row.

    Pass the queue as it was before this step's enqueue. Below the floor ``eps`` the loss is flat,
    so a near-duplicate in the queue gives a bounded loss and no gradient. ``exclude`` (B, K): rows
    that are not negatives of that query, never its s_max (a query with no negative left gets -1,
    the lowest cosine, so no loss and no gradient from the max).
    """
    similarities = q @ queue.detach().T
    if exclude is not None:
        similarities = similarities.masked_fill(exclude, -1.0)
    hardest = similarities.max(dim=1).values
    return -torch.log(torch.clamp(1.0 - hardest, min=eps)).mean()


def relational_loss(
    h_s: Tensor,
    h_t: Tensor,
    teacher_queue: Tensor,
    tau_s: float = 0.04,
    tau_t: float = 0.04,
    include_batch: bool = True,
    exclude: Tensor | None = None,
) -> Tensor:
    """Relational distillation: mean over the batch of KL(p_T || p_S).

    p_T = softmax(h_t . bank / tau_t), p_S = softmax(h_s . bank / tau_s), with h_s and h_t
    L2-normalised here and ``bank`` the queued teacher features (unit rows), preceded by this batch's
    teacher features when ``include_batch``. The teacher side is detached: gradient reaches h_s only.
    An empty bank (first step, include_batch off) gives a zero loss still attached to h_s.
    ``exclude`` (B, K): queued rows left out of that query's two distributions.
    """
    h_s = F.normalize(h_s, dim=1)
    h_t = F.normalize(h_t.detach(), dim=1)
    bank = teacher_queue.detach()
    if exclude is not None and include_batch:
        exclude = torch.cat([exclude.new_zeros(h_t.shape[0], h_t.shape[0]), exclude], dim=1)
    if include_batch:
        bank = torch.cat([h_t, bank], dim=0)
    if bank.shape[0] == 0:
        return h_s.sum() * 0.0
    teacher_logits, student_logits = h_t @ bank.T / tau_t, h_s @ bank.T / tau_s
    if exclude is not None:  # a large finite logit, not -inf: 0 * (-inf - -inf) would make the KL nan
        teacher_logits = teacher_logits.masked_fill(exclude, -1e4)
        student_logits = student_logits.masked_fill(exclude, -1e4)
    log_p_t = F.log_softmax(teacher_logits, dim=1)
    log_p_s = F.log_softmax(student_logits, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


@dataclass
class LossConfig:
    """Weights, temperatures and ablation switches; defaults are the paper's (docs/method.md)."""

    lambda_con: float = 1.0
    lambda_hn: float = 5.0
    lambda_rel: float = 1.0
    use_con: bool = True
    use_hn: bool = True
    use_rel: bool = True
    tau_con: float = 0.07
    tau_s: float = 0.04
    tau_t: float = 0.04
    rel_include_batch: bool = True
    mask_same_image: bool = True  # leave queued views of the query's own image out of L_con / L_hn
    rel_mask_same_image: bool = False  # also leave them out of L_rel's teacher bank
    hn_eps: float = 1e-3
    queue_size: int = 65536


class RDCDLoss(nn.Module):
    """L = lambda_con * (L_con + lambda_hn * L_hn) + lambda_rel * L_rel, with its two queues.

    ``forward`` returns a dict with ``loss`` and every term that is switched on (``con``, ``hn``,
    ``rel``); it does not touch the queues. Call ``enqueue`` after the step.
    """

    def __init__(self, descriptor_dim: int, teacher_dim: int, config: LossConfig | None = None):
        super().__init__()
        self.config = config or LossConfig()
        self.key_queue = FeatureQueue(self.config.queue_size, descriptor_dim, random_init=True)
        self.teacher_queue = FeatureQueue(self.config.queue_size, teacher_dim, random_init=False)

    def forward(self, z_s: Tensor, z_key: Tensor, h_s: Tensor, h_t: Tensor | None,
                image_ids: Tensor | None = None) -> dict[str, Tensor]:
        """z_s, z_key: unit student descriptors of view x and momentum keys of view x'; h_s, h_t:
        student kd-head output and teacher features of view x (normalised inside L_rel; None when
        L_rel is off); image_ids (B,): the training-image index of each row, for the same-image masks."""
        cfg = self.config
        terms: dict[str, Tensor] = {}
        keys = self.key_queue.features()
        exclude = same_image_mask(image_ids, self.key_queue.feature_ids()) if cfg.mask_same_image else None
        if cfg.use_con:
            terms["con"] = contrastive_loss(z_s, z_key, keys, cfg.tau_con, exclude)
        if cfg.use_hn:
            terms["hn"] = hard_negative_loss(z_s, keys, cfg.hn_eps, exclude)
        if cfg.use_rel:
            if h_t is None:
                raise ValueError("L_rel is on but no teacher features were given")
            bank_exclude = (same_image_mask(image_ids, self.teacher_queue.feature_ids())
                            if cfg.rel_mask_same_image else None)
            terms["rel"] = relational_loss(
                h_s, h_t, self.teacher_queue.features(), cfg.tau_s, cfg.tau_t, cfg.rel_include_batch, bank_exclude
            )
        if not terms:
            raise ValueError("LossConfig switches every loss term off; enable at least one of con, hn, rel")
        zero = z_s.new_zeros(())
        moco = terms.get("con", zero) + cfg.lambda_hn * terms.get("hn", zero)
        terms["loss"] = cfg.lambda_con * moco + cfg.lambda_rel * terms.get("rel", zero)
        return terms

    @torch.no_grad()
    def enqueue(self, z_key: Tensor, h_t: Tensor | None, image_ids: Tensor | None = None) -> None:
        """Enqueue keys and teacher features (already gathered from all processes), as unit vectors,
        with the training-image index of each (None: unknown). ``h_t`` None: no teacher (L_rel off)."""
        self.key_queue.enqueue(F.normalize(z_key, dim=1), image_ids)
        if h_t is not None:
            self.teacher_queue.enqueue(F.normalize(h_t, dim=1), image_ids)


@torch.no_grad()
def descriptor_stats(q: Tensor, k: Tensor, queue: Tensor) -> dict[str, float]:
    """Cosines to watch during training: positive pair mean, mean over all negatives, hardest negative mean."""
    similarities = q @ queue.T
    return {
        "pos_cos": (q * k).sum(dim=1).mean().item(),
        "neg_cos": similarities.mean().item(),
        "hardest_neg_cos": similarities.max(dim=1).values.mean().item(),
    }


@torch.no_grad()
def effective_rank(z: Tensor) -> float:
    """Entropy-based effective rank (Roy & Vetterli, 2007) of z (n, d), not centred.

    exp(H(p)) with p the singular values divided by their sum: d for an isotropic spread, 1 for a
    collapse onto one direction.
    """
    singular_values = torch.linalg.svdvals(z.double())
    if singular_values.sum() == 0:
        return 0.0
    p = singular_values / singular_values.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())
