import pytest
import torch

from distill.losses import IGNORE_INDEX, KDLoss, forward_kl


def test_forward_kl_zero_for_identical_logits_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(6, 32)
    assert forward_kl(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl(logits, torch.randn(6, 32)).item() > 0.01


def test_forward_kl_matches_torch_distributions():
    torch.manual_seed(1)
    s, t = torch.randn(5, 17), torch.randn(5, 17)
    for temperature in (1.0, 2.0):
        expected = (
            torch.distributions.kl_divergence(
                torch.distributions.Categorical(logits=t / temperature),
                torch.distributions.Categorical(logits=s / temperature),
            ).mean()
            * temperature**2
        )
        torch.testing.assert_close(forward_kl(s, t, temperature), expected)


def test_kd_loss_masks_ignored_positions():
    torch.manual_seed(2)
    s, t = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    labels = torch.randint(0, 11, (2, 4))
    labels[:, -1] = IGNORE_INDEX
    out = KDLoss(ce_weight=0.5)(s, t, labels)
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(out["kd"], forward_kl(s[keep], t[keep]))
    torch.testing.assert_close(out["loss"], out["kd"] + 0.5 * out["ce"])
    # changing a masked position's logits changes nothing
    s2 = s.clone()
    s2[:, -1] += 5.0
    torch.testing.assert_close(KDLoss(ce_weight=0.5)(s2, t, labels)["loss"], out["loss"])


def test_kd_loss_all_masked_is_zero_not_nan():
    s, t = torch.randn(1, 3, 7, requires_grad=True), torch.randn(1, 3, 7)
    out = KDLoss(ce_weight=1.0)(s, t, torch.full((1, 3), IGNORE_INDEX))
    assert out["loss"].item() == 0.0
    out["loss"].backward()


def test_unknown_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown KD loss"):
        KDLoss(kind="nope")
