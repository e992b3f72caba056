"""Losses and queues against values worked out by hand with plain python on tiny tensors."""
import math

import pytest
import torch

from rdcd.losses import (
    FeatureQueue,
    LossConfig,
    RDCDLoss,
    contrastive_loss,
    descriptor_stats,
    effective_rank,
    hard_negative_loss,
    relational_loss,
)

torch.set_num_threads(1)

# Unit vectors in 2-d: q . k = 0.6, q . queue rows = 0, -1, 0.8.
Q = [[1.0, 0.0]]
K = [[0.6, 0.8]]
QUEUE = [[0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_contrastive_loss_matches_hand_computed_infonce():
    tau = 0.5
    logits = [0.6 / tau, 0.0 / tau, -1.0 / tau, 0.8 / tau]
    expected = -math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
    assert contrastive_loss(t(Q), t(K), t(QUEUE), tau=tau).item() == pytest.approx(expected, rel=1e-12)


def test_contrastive_loss_averages_over_batch_without_in_batch_negatives():
    q = [[1.0, 0.0], [0.0, 1.0]]
    k = [[1.0, 0.0], [0.0, 1.0]]
    queue = [[0.0, -1.0]]
    tau = 1.0
    # row 0: logits [1, 0]; row 1: logits [1, -1]. The other row's key is NOT a negative.
    row0 = -math.log(math.exp(1) / (math.exp(1) + math.exp(0)))
    row1 = -math.log(math.exp(1) / (math.exp(1) + math.exp(-1)))
    assert contrastive_loss(t(q), t(k), t(queue), tau=tau).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)


def test_hard_negative_loss_uses_the_most_similar_queue_row():
    # q . queue = 0, -1, 0.8 -> s_max = 0.8 -> -log(0.2)
    assert hard_negative_loss(t(Q), t(QUEUE)).item() == pytest.approx(-math.log(0.2), rel=1e-12)


def test_hard_negative_loss_is_floored_at_eps():
    q = [[1.0, 0.0], [0.0, 1.0]]
    queue = [[1.0, 0.0], [-1.0, 0.0]]  # row 0 has a duplicate in the queue, row 1 sees s_max = 0
    expected = (-math.log(1e-3) + -math.log(1.0)) / 2
    assert hard_negative_loss(t(q), t(queue)).item() == pytest.approx(expected, rel=1e-12)


def test_relational_loss_matches_hand_computed_kl():
    h_t = [[1.0, 0.0]]
    h_s = [[0.0, 2.0]]  # normalised inside to (0, 1)
    bank = [[0.0, 1.0], [-1.0, 0.0], [0.8, 0.6]]
    tau_s, tau_t = 0.5, 0.25
    p_t = softmax([0.0 / tau_t, -1.0 / tau_t, 0.8 / tau_t])
    p_s = softmax([1.0 / tau_s, 0.0 / tau_s, 0.6 / tau_s])
    expected = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    got = relational_loss(t(h_s), t(h_t), t(bank), tau_s=tau_s, tau_t=tau_t, include_batch=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_relational_loss_prepends_current_teacher_batch_to_the_bank():
    h_t = [[1.0, 0.0]]
    h_s = [[0.0, 1.0]]
    bank = [[0.8, 0.6]]
    # bank seen by the loss: [h_t, (0.8, 0.6)]
    p_t = softmax([1.0, 0.8])
    p_s = softmax([0.0, 0.6])
    expected = sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    got = relational_loss(t(h_s), t(h_t), t(bank), tau_s=1.0, tau_t=1.0, include_batch=True)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_relational_loss_is_zero_when_student_equals_teacher():
    torch.manual_seed(0)
    h = torch.randn(4, 8, dtype=torch.float64)
    bank = torch.nn.functional.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1)
    assert relational_loss(h.clone(), h.clone(), bank).item() == pytest.approx(0.0, abs=1e-12)
    assert relational_loss(h, h * 3.0, bank).item() == pytest.approx(0.0, abs=1e-12)  # scale-free


def test_relational_loss_gradient_reaches_student_only():
    torch.manual_seed(0)
    h_s = torch.randn(3, 4, requires_grad=True)
    h_t = torch.randn(3, 4, requires_grad=True)
    bank = torch.nn.functional.normalize(torch.randn(5, 4), dim=1)
    relational_loss(h_s, h_t, bank).backward()
    assert h_s.grad is not None and h_s.grad.abs().sum() > 0
    assert h_t.grad is None


def test_relational_loss_with_empty_bank_is_zero_and_attached():
    h_s = torch.randn(2, 4, requires_grad=True)
    loss = relational_loss(h_s, torch.randn(2, 4), torch.zeros(0, 4), include_batch=False)
    assert loss.item() == 0.0
    loss.backward()
    assert h_s.grad is not None


# ---------------------------------------------------------------- FeatureQueue


def rows(*values):
    """Queue rows (v, -v) for each value, to tell rows apart."""
    return torch.tensor([[float(v), -float(v)] for v in values])


def test_queue_wraps_around_when_size_is_not_a_multiple_of_the_batch():
    queue = FeatureQueue(5, 2, random_init=False)
    assert queue.features().shape == (0, 2)
    # (batch, full buffer after it, ptr, filled) worked out by hand; 0 marks a never-written row
    steps = [
        ((1, 2), (1, 2, 0, 0, 0), 2, 2),
        ((3, 4), (1, 2, 3, 4, 0), 4, 4),
        ((5, 6), (6, 2, 3, 4, 5), 1, 5),
        ((7, 8), (6, 7, 8, 4, 5), 3, 5),
        ((9, 10), (6, 7, 8, 9, 10), 0, 5),
    ]
    for batch, buffer, ptr, filled in steps:
        queue.enqueue(rows(*batch))
        assert torch.equal(queue.queue, rows(*buffer))
        assert int(queue.ptr) == ptr
        assert int(queue.num_filled) == filled
        assert torch.equal(queue.features(), rows(*buffer[:filled]))


def test_queue_batch_larger_than_queue_keeps_the_newest_rows():
    queue = FeatureQueue(3, 2, random_init=False)
    queue.enqueue(rows(1))
    queue.enqueue(rows(2, 3, 4, 5, 6, 7))  # newest three: 5, 6, 7 written from ptr 1
    assert int(queue.num_filled) == 3
    assert int(queue.ptr) == 1
    assert torch.equal(queue.queue, rows(7, 5, 6))


def test_random_init_queue_starts_with_unit_vectors_and_uses_every_row():
    queue = FeatureQueue(7, 4, random_init=True)
    assert queue.features().shape == (7, 4)
    assert torch.allclose(queue.queue.norm(dim=1), torch.ones(7))


def test_queue_state_dict_round_trip():
    queue = FeatureQueue(5, 2, random_init=False)
    queue.enqueue(rows(1, 2, 3))
    state = queue.state_dict()
    assert set(state) == {"queue", "ptr", "num_filled", "ids"}
    restored = FeatureQueue(5, 2, random_init=False)
    restored.load_state_dict(state)
    assert torch.equal(restored.queue, queue.queue)
    old = {k: v for k, v in state.items() if k != "ids"}  # a checkpoint from before the ids
    FeatureQueue(5, 2, random_init=False).load_state_dict(old)
    assert int(restored.ptr) == 3 and int(restored.num_filled) == 3
    restored.enqueue(rows(4, 5, 6))
    assert torch.equal(restored.queue, rows(6, 2, 3, 4, 5))


# ---------------------------------------------------------------- RDCDLoss


def test_rdcd_loss_combines_terms_with_paper_weights():
    cfg = LossConfig(queue_size=3, tau_con=0.5, tau_s=1.0, tau_t=1.0, rel_include_batch=False)
    loss_fn = RDCDLoss(descriptor_dim=2, teacher_dim=2, config=cfg).double()
    loss_fn.key_queue.queue.copy_(t(QUEUE))
    loss_fn.teacher_queue.enqueue(t([[0.8, 0.6]]))
    out = loss_fn(t(Q), t(K), h_s=t([[0.0, 1.0]]), h_t=t([[1.0, 0.0]]))

    logits = [0.6 / 0.5, 0.0, -1.0 / 0.5, 0.8 / 0.5]
    con = -math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
    hn = -math.log(0.2)
    rel = 0.0  # a bank of one entry: both distributions are [1]
    assert out["con"].item() == pytest.approx(con, rel=1e-12)
    assert out["hn"].item() == pytest.approx(hn, rel=1e-12)
    assert out["rel"].item() == pytest.approx(rel, abs=1e-12)
    assert out["loss"].item() == pytest.approx(1.0 * (con + 5.0 * hn) + 1.0 * rel, rel=1e-12)


def test_rdcd_loss_switches_terms_off_and_never_touches_queues_in_forward():
    cfg = LossConfig(queue_size=4, use_con=False, use_rel=False)
    loss_fn = RDCDLoss(2, 2, cfg).double()
    loss_fn.key_queue.queue.copy_(t([[0.0, 1.0], [-1.0, 0.0], [0.8, 0.6], [0.0, -1.0]]))
    before = loss_fn.state_dict()
    before = {k: v.clone() for k, v in before.items()}
    out = loss_fn(t(Q), t(K), t(Q), t(Q))
    assert set(out) == {"hn", "loss"}
    assert out["loss"].item() == pytest.approx(5.0 * -math.log(0.2), rel=1e-12)
    for name, value in loss_fn.state_dict().items():
        assert torch.equal(value, before[name]), name

    with pytest.raises(ValueError):
        RDCDLoss(2, 2, LossConfig(queue_size=4, use_con=False, use_hn=False, use_rel=False))(t(Q), t(K), t(Q), t(Q))


def test_rdcd_enqueue_normalises_and_is_saved_in_state_dict():
    loss_fn = RDCDLoss(2, 3, LossConfig(queue_size=4))
    loss_fn.enqueue(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0, 2.0]]))
    assert torch.allclose(loss_fn.key_queue.queue[0], torch.tensor([0.6, 0.8]))
    assert torch.allclose(loss_fn.teacher_queue.features(), torch.tensor([[0.0, 0.0, 1.0]]))
    state = loss_fn.state_dict()
    assert {"key_queue.queue", "key_queue.ptr", "teacher_queue.queue", "teacher_queue.num_filled"} <= set(state)


# ---------------------------------------------------------------- same-image keys


def test_query_gets_no_hard_negative_or_contrastive_term_from_its_own_earlier_key():
    """Image 7's earlier view sits in the queue as the row nearest to its query: it must not be
    s_max of L_hn nor a negative of L_con; the other rows still are."""
    cfg = LossConfig(queue_size=3, tau_con=0.5, use_rel=False)
    loss_fn = RDCDLoss(2, 2, cfg).double()
    loss_fn.enqueue(t(QUEUE), None, torch.tensor([3, 4, 7]))  # row [0.8, 0.6] is image 7's
    out = loss_fn(t(Q), t(K), t(Q), None, image_ids=torch.tensor([7]))
    hn_without_own = -math.log(1 - 0.0)  # hardest remaining negative: cosine 0 (row [0, 1])
    logits = [0.6 / 0.5, 0.0 / 0.5, -1.0 / 0.5]
    con_without_own = -math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
    assert out["hn"].item() == pytest.approx(hn_without_own, abs=1e-12)
    assert out["con"].item() == pytest.approx(con_without_own, rel=1e-12)
    # another image's query still sees the row as its hardest negative
    other = loss_fn(t(Q), t(K), t(Q), None, image_ids=torch.tensor([8]))
    assert other["hn"].item() == pytest.approx(-math.log(0.2), rel=1e-12)
    # switched off: the paper's behaviour
    loss_fn.config.mask_same_image = False
    assert loss_fn(t(Q), t(K), t(Q), None, image_ids=torch.tensor([7]))["hn"].item() == pytest.approx(-math.log(0.2))


def test_queue_stores_image_ids_and_wraps_with_them():
    queue = FeatureQueue(3, 2, random_init=True)
    assert torch.equal(queue.feature_ids(), torch.tensor([-1, -1, -1]))  # random rows belong to no image
    queue.enqueue(rows(1, 2), torch.tensor([10, 11]))
    queue.enqueue(rows(3, 4), torch.tensor([12, 13]))
    assert torch.equal(queue.ids, torch.tensor([13, 11, 12]))
    queue.enqueue(rows(5))  # no ids given: unknown
    assert torch.equal(queue.ids, torch.tensor([13, -1, 12]))


def test_rel_bank_masks_same_image_rows_only_when_asked():
    h_s, h_t = t([[0.0, 1.0]]), t([[1.0, 0.0]])
    bank = t([[0.8, 0.6], [0.6, 0.8]])
    exclude = torch.tensor([[True, False]])
    masked = relational_loss(h_s, h_t, bank, 1.0, 1.0, include_batch=False, exclude=exclude)
    assert masked.item() == pytest.approx(0.0, abs=1e-9)  # one row left: both distributions are [1]
    kept = relational_loss(h_s, h_t, bank, 1.0, 1.0, include_batch=False)
    assert kept.item() > 0.01


# ---------------------------------------------------------------- weights and batches by hand


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_rdcd_loss_weights_every_term_with_distinct_lambdas():
    cfg = LossConfig(queue_size=3, tau_con=0.5, tau_s=0.5, tau_t=0.25, rel_include_batch=False,
                     lambda_con=0.7, lambda_hn=3.0, lambda_rel=2.5)
    loss_fn = RDCDLoss(descriptor_dim=2, teacher_dim=2, config=cfg).double()
    loss_fn.key_queue.queue.copy_(t(QUEUE))
    loss_fn.teacher_queue.enqueue(t([[0.8, 0.6], [0.0, 1.0]]))
    out = loss_fn(t(Q), t(K), h_s=t([[0.0, 1.0]]), h_t=t([[1.0, 0.0]]))
    logits = [0.6 / 0.5, 0.0, -1.0 / 0.5, 0.8 / 0.5]
    con = -math.log(math.exp(logits[0]) / sum(math.exp(x) for x in logits))
    hn = -math.log(0.2)
    p_t = softmax([0.8 / 0.25, 0.0 / 0.25])
    p_s = softmax([0.6 / 0.5, 1.0 / 0.5])
    rel = kl(p_t, p_s)
    assert min(con, hn, rel) > 0.01  # every term contributes
    assert out["rel"].item() == pytest.approx(rel, rel=1e-10)
    assert out["loss"].item() == pytest.approx(0.7 * (con + 3.0 * hn) + 2.5 * rel, rel=1e-10)


def test_relational_loss_batch_of_two_with_batch_prepended_by_hand():
    """Bank = [h_T of the batch (2 rows), queue (1 row)]; KL averaged over the 2 rows."""
    h_s = t([[0.6, 0.8], [1.0, 0.0]])
    h_t = t([[1.0, 0.0], [0.0, 1.0]])
    queue = t([[0.8, 0.6]])
    bank = [[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]
    tau_s, tau_t = 0.5, 0.2

    def dots(v):
        return [v[0] * b[0] + v[1] * b[1] for b in bank]

    expected = 0.0
    for s_row, t_row in zip(h_s.tolist(), h_t.tolist()):
        p_t = softmax([x / tau_t for x in dots(t_row)])
        p_s = softmax([x / tau_s for x in dots(s_row)])
        expected += kl(p_t, p_s) / 2
    got = relational_loss(h_s, h_t, queue, tau_s=tau_s, tau_t=tau_t, include_batch=True)
    assert got.item() == pytest.approx(expected, rel=1e-10)


# ---------------------------------------------------------------- diagnostics


def test_descriptor_stats_by_hand():
    stats = descriptor_stats(t(Q), t(K), t(QUEUE))
    assert stats["pos_cos"] == pytest.approx(0.6)
    assert stats["neg_cos"] == pytest.approx((0.0 - 1.0 + 0.8) / 3)
    assert stats["hardest_neg_cos"] == pytest.approx(0.8)


def test_effective_rank_identity_and_rank_one():
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0)
    assert effective_rank(3.0 * torch.eye(4)) == pytest.approx(4.0)
    rank_one = torch.outer(torch.arange(1.0, 6.0), torch.tensor([1.0, -2.0, 0.5]))
    assert effective_rank(rank_one) == pytest.approx(1.0, abs=1e-6)
    # singular values (2, 1): p = (2/3, 1/3)
    expected = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert effective_rank(torch.diag(torch.tensor([2.0, 1.0]))) == pytest.approx(expected)
