"""Each logit divergence against a direct torch.distributions computation; chunking; top-k."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, kl_divergence

from distill.losses import (
    DIVERGENCES,
    IGNORE_INDEX,
    HeadStates,
    KDLoss,
    TopK,
    _kl,
    cross_entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)


def _cat(logits=None, probs=None):
    return Categorical(logits=logits) if probs is None else Categorical(probs=probs)


def _reference(kind: str, s: torch.Tensor, t: torch.Tensor, beta=0.5, alpha=0.1) -> torch.Tensor:
    """Per-row divergence from torch.distributions / plain probabilities, (N,)."""
    ps, pt = _cat(s), _cat(t)
    if kind == "forward_kl":
        return kl_divergence(pt, ps)
    if kind == "reverse_kl":
        return kl_divergence(ps, pt)
    if kind == "jsd":
        m = _cat(probs=beta * pt.probs + (1 - beta) * ps.probs)
        return beta * kl_divergence(pt, m) + (1 - beta) * kl_divergence(ps, m)
    if kind == "skew_forward_kl":
        return kl_divergence(pt, _cat(probs=alpha * pt.probs + (1 - alpha) * ps.probs))
    if kind == "skew_reverse_kl":
        return kl_divergence(ps, _cat(probs=alpha * ps.probs + (1 - alpha) * pt.probs))
    return 0.5 * (ps.probs - pt.probs).abs().sum(-1)


@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_divergence_matches_torch_distributions(kind, temperature):
    torch.manual_seed(1)
    s, t = torch.randn(5, 17) * 3, torch.randn(5, 17) * 3
    loss = KDLoss(kind=kind, temperature=temperature, beta=0.3, alpha=0.2)
    expected = _reference(kind, s / temperature, t / temperature, beta=0.3, alpha=0.2)
    torch.testing.assert_close(loss.divergence(s, t), expected * temperature**2)


@pytest.mark.parametrize("fn", [forward_kl, reverse_kl, generalized_jsd, total_variation])
def test_divergences_zero_for_identical_and_positive_otherwise(fn):
    torch.manual_seed(0)
    log_p = F.log_softmax(torch.randn(6, 32), -1)
    assert fn(log_p, log_p.clone()).abs().max().item() < 1e-6
    assert fn(log_p, F.log_softmax(torch.randn(6, 32), -1)).min().item() > 1e-3


def test_skew_with_alpha_zero_is_plain_kl_and_jsd_is_symmetric_at_half():
    torch.manual_seed(3)
    a, b = F.log_softmax(torch.randn(4, 9), -1), F.log_softmax(torch.randn(4, 9), -1)
    torch.testing.assert_close(skew_forward_kl(a, b, alpha=0.0), forward_kl(a, b))
    torch.testing.assert_close(skew_reverse_kl(a, b, alpha=0.0), reverse_kl(a, b))
    torch.testing.assert_close(generalized_jsd(a, b, 0.5), generalized_jsd(b, a, 0.5))
    assert generalized_jsd(a, b).max() <= torch.log(torch.tensor(2.0))  # JSD ≤ ln 2


def test_fp16_logits_are_softmaxed_in_fp32():
    torch.manual_seed(4)
    s, t = torch.randn(3, 50) * 8, torch.randn(3, 50) * 8
    loss = KDLoss()
    half = loss.divergence(s.half(), t.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, loss.divergence(s.half().float(), t.half().float()))


def test_kd_loss_masks_ignored_positions_and_adds_weighted_ce():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    labels = torch.randint(0, 11, (2, 4))
    labels[:, -1] = IGNORE_INDEX
    out = KDLoss(ce_weight=0.5)(s, t, labels)
    keep = labels != IGNORE_INDEX
    expected_kd = kl_divergence(_cat(t[keep]), _cat(s[keep])).mean()
    torch.testing.assert_close(out["kd"], expected_kd)
    torch.testing.assert_close(out["ce"], F.cross_entropy(s[keep], labels[keep]))
    torch.testing.assert_close(out["loss"], out["kd"] + 0.5 * out["ce"])
    s2 = s.clone()
    s2[:, -1] += 5.0  # a masked position's logits change nothing
    torch.testing.assert_close(KDLoss(ce_weight=0.5)(s2, t, labels)["loss"], out["loss"])


def test_kd_loss_all_masked_is_zero_not_nan():
    s, t = torch.randn(1, 3, 7, requires_grad=True), torch.randn(1, 3, 7)
    out = KDLoss(ce_weight=1.0)(s, t, torch.full((1, 3), IGNORE_INDEX))
    assert out["loss"].item() == 0.0
    out["loss"].backward()


def test_without_teacher_the_loss_is_plain_ce():
    torch.manual_seed(5)
    s, labels = torch.randn(2, 5, 13), torch.randint(0, 13, (2, 5))
    out = KDLoss()(s, None, labels)
    assert set(out) == {"ce", "loss"}
    torch.testing.assert_close(out["loss"], F.cross_entropy(s.flatten(0, 1), labels.flatten()))


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_chunked_from_hidden_states_equals_unchunked_values_and_grads(kind):
    """lm_head applied per chunk (with recompute in backward) == one dense pass."""
    torch.manual_seed(6)
    vocab, width = 300, 16
    # Both heads carry padding rows past the shared vocabulary (the teacher's own count):
    # the loss must cut both sides, the teacher too, on the per-chunk path.
    s_head, t_head = torch.nn.Linear(width, vocab + 4, bias=False), torch.nn.Linear(24, vocab + 8)
    s_states = torch.randn(3, 10, width, requires_grad=True)
    t_states = torch.randn(3, 10, 24)
    labels = torch.randint(0, vocab, (3, 10))
    labels[0, :4] = IGNORE_INDEX

    def run(chunk_size: int, dense: bool):
        s_states.grad, s_head.weight.grad = None, None
        loss = KDLoss(kind=kind, temperature=2.0, ce_weight=0.3, chunk_size=chunk_size)
        if dense:  # full logits, sliced to the shared vocabulary
            out = loss(s_head(s_states)[..., :vocab], t_head(t_states)[..., :vocab], labels)
        else:
            out = loss(HeadStates(s_states, s_head), HeadStates(t_states, t_head), labels, vocab)
        out["loss"].backward()
        return out["loss"].detach(), s_states.grad.clone(), s_head.weight.grad.clone()

    reference = run(10_000, dense=True)
    for chunk in (1, 7, 26, 10_000):
        for got, want in zip(run(chunk, dense=False), reference, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_topk_with_full_k_equals_dense_forward_kl():
    torch.manual_seed(7)
    s, t = torch.randn(2, 3, 12), torch.randn(2, 3, 12)
    labels = torch.zeros(2, 3, dtype=torch.long)
    top = F.log_softmax(t, -1).topk(12, dim=-1)
    sparse = KDLoss()(s, TopK(top.values, top.indices), labels)["kd"]
    torch.testing.assert_close(sparse, KDLoss()(s, t, labels)["kd"], rtol=1e-4, atol=1e-5)


def test_topk_counts_the_tail_mass_in_a_rest_bucket():
    """KL over (top-k tokens, rest) equals a direct computation on the bucketed distributions,
    so mass the student puts outside the teacher's top-k is penalised, not ignored."""
    torch.manual_seed(8)
    s, t = torch.randn(4, 20), torch.randn(4, 20)
    k = 5
    top = F.log_softmax(t, -1).topk(k, dim=-1)
    got = KDLoss().divergence(s, TopK(top.values.half(), top.indices.int()))

    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    ps_top, pt_top = ps.gather(-1, top.indices), pt.gather(-1, top.indices)
    ps_b = torch.cat([ps_top, 1 - ps_top.sum(-1, keepdim=True)], -1)
    pt_b = torch.cat([pt_top, 1 - pt_top.sum(-1, keepdim=True)], -1)
    expected = kl_divergence(Categorical(probs=pt_b), Categorical(probs=ps_b))
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)  # fp16 cache values
    # moving student mass from the teacher's top-k into the tail raises the loss
    tail = torch.ones(20, dtype=torch.bool)
    tail[top.indices[0]] = False
    s_worse = s.clone()
    s_worse[0, tail] += 3.0
    assert KDLoss().divergence(s_worse, TopK(top.values, top.indices))[0] > got[0] + 0.1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "nope"}, "unknown KD loss"),
        ({"temperature": 0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"kind": "jsd", "beta": 1.0}, "beta"),
        ({"kind": "jsd", "beta": 0.0}, "beta"),
        ({"kind": "skew_forward_kl", "alpha": 1.0}, "alpha"),
        ({"kind": "skew_forward_kl", "alpha": -0.1}, "alpha"),
        ({"kind": "skew_reverse_kl", "alpha": 1.0}, "alpha"),
        ({"kind": "skew_reverse_kl", "alpha": -0.1}, "alpha"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"hidden_loss": "l1"}, "hidden_loss"),
        ({"on_policy_fraction": 1.5}, "on_policy_fraction"),
        ({"on_policy_fraction": -0.1}, "on_policy_fraction"),
    ],
)
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KDLoss(**kwargs)


def test_settings_at_the_edges_are_accepted_and_kept_for_the_module():
    """The fields DistillModule reads (hidden KD, on-policy share, cache) are stored as given;
    range edges that are valid construct."""
    loss = KDLoss(
        kind="skew_reverse_kl", temperature=0.5, kd_weight=0.7, ce_weight=0.2, alpha=0.0,
        chunk_size=1, hidden_weight=0.3, hidden_loss="cosine", on_policy_fraction=1.0,
        cache="cache-dir", top_k=8,
    )  # fmt: skip
    assert (loss.kind, loss.temperature, loss.kd_weight, loss.ce_weight) == (
        "skew_reverse_kl", 0.5, 0.7, 0.2,
    )  # fmt: skip
    assert loss.params == {"alpha": 0.0} and loss.chunk_size == 1
    assert (loss.hidden_weight, loss.hidden_loss, loss.on_policy_fraction) == (0.3, "cosine", 1.0)
    assert (loss.cache, loss.top_k) == ("cache-dir", 8)
    assert KDLoss(kind="jsd", beta=0.25).params == {"beta": 0.25}
    assert KDLoss(kind="forward_kl", beta=0.25, alpha=0.3).params == {}
    assert KDLoss(on_policy_fraction=0.0).on_policy_fraction == 0.0


@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
def test_zero_probability_tokens_count_as_zero_not_nan(kind):
    """A distribution with exact zeros (log p = -inf, e.g. a masked vocabulary) gives a
    finite divergence equal to the one over its support: 0 · log 0 = 0. The zeros go on the
    side KL averages over (the teacher; the student for reverse KL)."""
    torch.manual_seed(9)
    full = F.log_softmax(torch.randn(3, 6), -1)
    zeroed = torch.randn(3, 6)
    zeroed[:, 4:] = float("-inf")
    zeroed = zeroed.log_softmax(-1)
    log_ps, log_pt = (zeroed, full) if kind == "reverse_kl" else (full, zeroed)
    got = DIVERGENCES[kind](log_ps, log_pt)
    assert torch.isfinite(got).all()
    expected = _reference(kind, log_ps, log_pt, beta=0.5, alpha=0.1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_one_valid_row_is_its_own_mean():
    torch.manual_seed(10)
    s, t = torch.randn(1, 3, 7), torch.randn(1, 3, 7)
    labels = torch.full((1, 3), IGNORE_INDEX)
    labels[0, 1] = 4
    out = KDLoss(ce_weight=1.0, kd_weight=2.0)(s, t, labels)
    torch.testing.assert_close(out["kd"], kl_divergence(_cat(t[0, 1]), _cat(s[0, 1])))
    torch.testing.assert_close(out["ce"], F.cross_entropy(s[0, 1:2], labels[0, 1:2]))
    torch.testing.assert_close(out["loss"], 2.0 * out["kd"] + out["ce"])


def test_ce_only_and_kd_only_weights():
    """kd_weight = 0 drops the KD term; with a teacher and ce_weight = 0 there is no CE term."""
    torch.manual_seed(11)
    s, t, labels = torch.randn(2, 3, 9), torch.randn(2, 3, 9), torch.randint(0, 9, (2, 3))
    ce_only = KDLoss(kd_weight=0.0, ce_weight=0.5)(s, t, labels)
    assert set(ce_only) == {"ce", "loss"}
    torch.testing.assert_close(ce_only["loss"], 0.5 * ce_only["ce"])
    kd_only = KDLoss(kd_weight=3.0)(s, t, labels)
    assert set(kd_only) == {"kd", "loss"}
    torch.testing.assert_close(kd_only["loss"], 3.0 * kd_only["kd"])


def test_chunked_head_states_keep_no_logits_for_backward():
    """With hidden states and several chunks, the logits are recomputed in backward: nothing
    saved for backward is as large as even one chunk of logits."""
    torch.manual_seed(12)
    vocab, width, chunk = 300, 16, 4
    s_head, t_head = torch.nn.Linear(width, vocab, bias=False), torch.nn.Linear(width, vocab)
    s, t = torch.randn(1, 30, width, requires_grad=True), torch.randn(1, 30, width)
    labels = torch.randint(0, vocab, (1, 30))
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel())
        return x

    loss = KDLoss(chunk_size=chunk, ce_weight=0.5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = loss(HeadStates(s, s_head), HeadStates(t, t_head), labels)
    assert saved and sum(saved) < chunk * vocab
    out["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
def test_a_cache_holding_all_the_mass_stays_finite(kind):
    """k = V: both rest buckets are empty (Σ p = 1). The clamp keeps log(rest) finite, so every
    divergence and its gradient stay finite instead of inf · 0 or inf − inf."""
    torch.manual_seed(13)
    s = torch.randn(2, 3, 10, requires_grad=True)
    t = torch.randn(2, 3, 10)
    top = F.log_softmax(t, -1).topk(10, dim=-1)
    out = KDLoss(kind=kind)(s, TopK(top.values, top.indices), torch.zeros(2, 3, dtype=torch.long))
    assert torch.isfinite(out["kd"]) and out["kd"] < 1e3
    out["loss"].backward()
    assert torch.isfinite(s.grad).all()


def test_defaults_are_plain_forward_kd_and_the_divergences_own_parameters():
    """KDLoss() is forward KL at T = 1 with nothing else switched on; β and α default to the
    divergence functions' own defaults."""
    import inspect

    loss = KDLoss()
    assert (loss.kind, loss.temperature, loss.kd_weight, loss.ce_weight) == ("forward_kl", 1, 1, 0)
    assert (loss.hidden_weight, loss.hidden_loss, loss.on_policy_fraction) == (0.0, "mse", 0.0)
    assert loss.cache is None and loss.top_k == 64
    beta = inspect.signature(generalized_jsd).parameters["beta"].default
    alpha = inspect.signature(skew_forward_kl).parameters["alpha"].default
    assert KDLoss(kind="jsd").params == {"beta": beta}
    assert KDLoss(kind="skew_forward_kl").params == {"alpha": alpha}
    assert KDLoss(kind="skew_reverse_kl").params == {"alpha": alpha}


def test_cross_entropy_skips_ignored_rows_and_is_zero_with_a_graph_when_all_are():
    torch.manual_seed(14)
    logits = torch.randn(5, 7, requires_grad=True)
    labels = torch.tensor([1, IGNORE_INDEX, 3, IGNORE_INDEX, 6])
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(
        cross_entropy(logits, labels), F.cross_entropy(logits[keep], labels[keep])
    )
    none = cross_entropy(logits, torch.full((5,), IGNORE_INDEX))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert logits.grad is not None and not logits.grad.any()


def test_skew_alpha_defaults_to_a_tenth():
    torch.manual_seed(15)
    a, b = F.log_softmax(torch.randn(3, 8), -1), F.log_softmax(torch.randn(3, 8), -1)
    torch.testing.assert_close(skew_forward_kl(a, b), skew_forward_kl(a, b, alpha=0.1))
    torch.testing.assert_close(skew_reverse_kl(a, b), skew_reverse_kl(a, b, alpha=0.1))
    torch.testing.assert_close(generalized_jsd(a, b), generalized_jsd(a, b, beta=0.5))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "top-k"])
def test_kd_plus_ce_terms_and_gradients_match_separate_losses(temperature, sparse):
    """KD + CE in one pass (at T = 1 the CE reuses KD's log-probs) gives the values and the
    gradients of the two losses computed apart: CE always on the raw logits."""
    torch.manual_seed(13)
    s = torch.randn(2, 5, 11, requires_grad=True)
    t = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    teacher = t
    if sparse:
        top = F.log_softmax(t / temperature, -1).topk(4, dim=-1)
        teacher = TopK(top.values, top.indices)
    out = KDLoss(temperature=temperature, ce_weight=0.7)(s, teacher, labels)
    (grad,) = torch.autograd.grad(out["loss"], s)

    kd_alone = KDLoss(temperature=temperature)(s, teacher, labels)["kd"]
    ce_alone = F.cross_entropy(s.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out["kd"], kd_alone)
    torch.testing.assert_close(out["ce"], ce_alone)
    (expected,) = torch.autograd.grad(kd_alone + 0.7 * ce_alone, s)
    torch.testing.assert_close(grad, expected)


def test_kd_plus_ce_at_t1_saves_one_log_softmax_for_backward():
    """At T = 1 the CE term reads KD's log-probs: the step keeps one (N, V) fp32 tensor for
    backward from the student's softmax, not two (the rows are the step's largest tensors)."""
    torch.manual_seed(14)
    n, vocab = 6, 4096
    s = torch.randn(1, n, vocab, requires_grad=True)
    t, labels = torch.randn(1, n, vocab), torch.randint(0, vocab, (1, n))
    saved: list[torch.Tensor] = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda x: x):
        KDLoss(ce_weight=1.0)(s, t, labels)
    big = {x.data_ptr() for x in saved if x.numel() == n * vocab}
    # the student's log-probs and what the divergence keeps of the teacher (4 when CE ran its
    # own log-softmax)
    assert len(big) <= 3, f"{len(big)} distinct (N, V) tensors saved for backward"


def test_forward_kl_is_the_plain_kl_and_keeps_only_the_teacher_probs_for_backward():
    """forward_kl splits KL into Σ p_t log p_t − Σ p_t log p_s to keep the step's peak low: same
    value and gradients (on both sides) as the one-product `_kl`, and with a teacher that takes
    no gradient, backward keeps one (N, V) tensor (p_t) where `_kl` keeps several."""
    torch.manual_seed(14)
    rows = (F.log_softmax(torch.randn(5, 11), -1), F.log_softmax(torch.randn(5, 11) * 3, -1))
    split = [r.clone().requires_grad_() for r in rows]
    plain = [r.clone().requires_grad_() for r in rows]
    weights = torch.randn(5)
    (forward_kl(*split) * weights).sum().backward()
    (_kl(plain[1], plain[0]) * weights).sum().backward()
    torch.testing.assert_close(forward_kl(*split), _kl(plain[1], plain[0]))
    for a, b in zip(split, plain, strict=True):
        torch.testing.assert_close(a.grad, b.grad)

    def saved_numel(fn) -> int:
        saved: list[int] = []
        log_ps = rows[0].clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(
            lambda x: saved.append(x.numel()) or x, lambda x: x
        ):
            fn(log_ps, rows[1])
        return sum(saved)

    assert saved_numel(forward_kl) == 5 * 11
    assert saved_numel(lambda s, t: _kl(t, s)) >= 2 * 5 * 11  # p and the mask


@pytest.mark.parametrize("ce_weight", [0.0, 1.0])
def test_one_chunk_keeps_two_row_tensors_for_backward(ce_weight):
    """A single chunk of head states (no checkpointing): backward keeps the student's
    log-probs and the teacher's probabilities, nothing more — no logits, no second softmax for
    CE (at T = 1 CE reads KD's log-probs), and no CE graph when CE is off."""
    torch.manual_seed(15)
    rows, width, vocab = 12, 8, 50
    head = torch.nn.Linear(width, vocab, bias=False)
    s = torch.randn(1, rows, width, requires_grad=True)
    t = torch.randn(1, rows, vocab)
    saved: set[tuple[int, int]] = set()  # (storage, numel): nll_loss re-saves KD's log-probs
    with torch.autograd.graph.saved_tensors_hooks(
        lambda x: saved.add((x.data_ptr(), x.numel())) or x, lambda x: x
    ):
        KDLoss(ce_weight=ce_weight)(HeadStates(s, head), t, torch.randint(0, vocab, (1, rows)))
    assert sum(n == rows * vocab for _, n in saved) == 2
