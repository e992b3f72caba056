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
    rows.
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

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def features(self) -> Tensor:
        """The rows a loss should read: all of them (random init) or only the filled ones."""
        if self.random_init:
            return self.queue
        return self.queue[: int(self.num_filled)]

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write ``keys`` (n, dim) over the oldest rows; the keys are detached."""
        if keys.ndim != 2 or keys.shape[1] != self.queue.shape[1]:
            raise ValueError(f"expected keys of shape (n, {self.queue.shape[1]}), got {tuple(keys.shape)}")
        keys = keys.detach()[-self.size :].to(self.queue.dtype)
        n = keys.shape[0]
        rows = (self.ptr + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[rows] = keys
        self.ptr.copy_((self.ptr + n) % self.size)
        self.num_filled.copy_(torch.clamp(self.num_filled + n, max=self.size))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.queue.shape[1]}, random_init={self.random_init}"


def contrastive_loss(q: Tensor, k: Tensor, queue: Tensor, tau: float = 0.07) -> Tensor:
    """MoCo InfoNCE. q, k: (B, d) unit vectors (k is the positive of q); queue: (K, d) unit negatives.

    logits = [q.k, q.queue^T] / tau, cross-entropy with the positive at index 0. No in-batch
    negatives. Keys and queue are constants (detached), as in MoCo.
    """
    positive = (q * k.detach()).sum(dim=1, keepdim=True)  # (B, 1)
    negatives = q @ queue.detach().T  # (B, K)
    logits = torch.cat([positive, negatives], dim=1) / tau
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def hard_negative_loss(q: Tensor, queue: Tensor, eps: float = 1e-3) -> Tensor:
    """Mean over the batch of -log(max(1 - s_max, eps)), s_max = largest cosine of q to a queue row.

    Pass the queue as it was before this step's enqueue. Below the floor ``eps`` the loss is flat,
    so a near-duplicate in the queue gives a bounded loss and no gradient.
    """
    hardest = (q @ queue.detach().T).max(dim=1).values
    return -torch.log(torch.clamp(1.0 - hardest, min=eps)).mean()


def relational_loss(
    h_s: Tensor,
    h_t: Tensor,
    teacher_queue: Tensor,
    tau_s: float = 0.04,
    tau_t: float = 0.04,
    include_batch: bool = True,
) -> Tensor:
    """Relational distillation: mean over the batch of KL(p_T || p_S).

    p_T = softmax(h_t . bank / tau_t), p_S = softmax(h_s . bank / tau_s), with h_s and h_t
    L2-normalised here and ``bank`` the queued teacher features (unit rows), preceded by this batch's
    teacher features when ``include_batch``. The teacher side is detached: gradient reaches h_s only.
    An empty bank (first step, include_batch off) gives a zero loss still attached to h_s.
    """
    h_s = F.normalize(h_s, dim=1)
    h_t = F.normalize(h_t.detach(), dim=1)
    bank = teacher_queue.detach()
    if include_batch:
        bank = torch.cat([h_t, bank], dim=0)
    if bank.shape[0] == 0:
        return h_s.sum() * 0.0
    log_p_t = F.log_softmax(h_t @ bank.T / tau_t, dim=1)
    log_p_s = F.log_softmax(h_s @ bank.T / tau_s, dim=1)
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

    def forward(self, z_s: Tensor, z_key: Tensor, h_s: Tensor, h_t: Tensor) -> dict[str, Tensor]:
        """z_s, z_key: unit student descriptors of view x and momentum keys of view x'; h_s, h_t:
        student kd-head output and teacher features of view x (normalised inside L_rel)."""
        cfg = self.config
        terms: dict[str, Tensor] = {}
        keys = self.key_queue.features()
        if cfg.use_con:
            terms["con"] = contrastive_loss(z_s, z_key, keys, cfg.tau_con)
        if cfg.use_hn:
            terms["hn"] = hard_negative_loss(z_s, keys, cfg.hn_eps)
        if cfg.use_rel:
            terms["rel"] = relational_loss(
                h_s, h_t, self.teacher_queue.features(), cfg.tau_s, cfg.tau_t, cfg.rel_include_batch
            )
        if not terms:
            raise ValueError("LossConfig switches every loss term off; enable at least one of con, hn, rel")
        zero = z_s.new_zeros(())
        moco = terms.get("con", zero) + cfg.lambda_hn * terms.get("hn", zero)
        terms["loss"] = cfg.lambda_con * moco + cfg.lambda_rel * terms.get("rel", zero)
        return terms

    @torch.no_grad()
    def enqueue(self, z_key: Tensor, h_t: Tensor) -> None:
        """Enqueue keys and teacher features (already gathered from all processes), as unit vectors."""
        self.key_queue.enqueue(F.normalize(z_key, dim=1))
        self.teacher_queue.enqueue(F.normalize(h_t, dim=1))


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
