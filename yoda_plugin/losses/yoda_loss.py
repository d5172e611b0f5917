"""The masked noise loss of YODA (paper Eq. 10) in BasicSR's loss registry."""
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from yoda_plugin.core.loss import LOSS_TYPES, NORMALIZATIONS, masked_noise_loss


@LOSS_REGISTRY.register()
class MaskedNoiseLoss(nn.Module):
    """``loss_weight * || M(t) * (eps - eps_pred) ||`` (Eq. 10); vanilla Eq. 8 when mask is None.

    Args:
        loss_weight: multiplier, as every BasicSR loss.
        loss_type: ``l1`` (the paper) or ``l2``.
        normalization: ``all`` (mean over all elements, the literal Eq. 10) or
            ``masked`` (mean over masked elements).
    """

    def __init__(self, loss_weight: float = 1.0, loss_type: str = 'l1', normalization: str = 'all'):
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f'train.pixel_opt.loss_type must be one of {LOSS_TYPES}, got {loss_type!r}')
        if normalization not in NORMALIZATIONS:
            raise ValueError(f'train.pixel_opt.normalization must be one of {NORMALIZATIONS}, got {normalization!r}')
        self.loss_weight = loss_weight
        self.loss_type = loss_type
        self.normalization = normalization

    def forward(self, pred, target, mask=None):
        return self.loss_weight * masked_noise_loss(pred, target, mask, self.loss_type, self.normalization)
