"""Memory-lean autograd for a DDL's selected head, leak and next-block input.

The plain autograd graph of `next = feature + [image, 0, leak]` keeps both the block output
and the next input alive for backward: one extra (B, C, h, w) tensor per layer. This function
saves the next input (which the next block saves anyway, so the storage is shared) plus the
2 * C_img channels it changed, and rebuilds the block output from them in backward.
"""

from __future__ import annotations

import torch


class _SelectInject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feature, selected, residual, head_channels: int, leak_choice: bool):
        batch, channels, height, width = feature.shape
        c = selected.shape[1]
        flat = feature.reshape(batch, channels, height * width)
        image = torch.bmm(selected, flat[:, :head_channels]) + residual.reshape(batch, c, -1)
        out = feature.clone(memory_format=torch.contiguous_format)
        out_flat = out.view(batch, channels, height * width)
        out_flat[:, :c] += image
        first = feature[:, :c].clone()
        last = None
        if leak_choice:
            out_flat[:, channels - c :] += torch.bmm(selected, flat[:, head_channels:])
            last = feature[:, channels - c :].clone()
        ctx.head_channels = head_channels
        ctx.leak_choice = leak_choice
        ctx.save_for_backward(selected, first, last, out)
        return image.view(batch, c, height, width), out

    @staticmethod
    def backward(ctx, grad_image, grad_out):
        selected, first, last, out = ctx.saved_tensors
        batch, channels, height, width = out.shape
        c = selected.shape[1]
        head = ctx.head_channels
        # Rebuild the block output: only the first and last C_img channels differ from `out`.
        feature = out.clone()
        feature[:, :c] = first
        if ctx.leak_choice:
            feature[:, channels - c :] = last
        flat = feature.view(batch, channels, height * width)

        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_out = grad_out.reshape(batch, channels, height * width)
        grad_pixels = grad_out[:, :c]
        if grad_image is not None:
            grad_pixels = grad_pixels + grad_image.reshape(batch, c, height * width)

        grad_feature = grad_out.clone()
        selected_t = selected.transpose(1, 2)
        grad_feature[:, :head] += torch.bmm(selected_t, grad_pixels)
        grad_selected = torch.bmm(grad_pixels, flat[:, :head].transpose(1, 2))
        if ctx.leak_choice:
            grad_leak = grad_out[:, channels - c :]
            grad_feature[:, head:] += torch.bmm(selected_t, grad_leak)
            grad_selected = grad_selected + torch.bmm(grad_leak, flat[:, head:].transpose(1, 2))
        grad_residual = grad_pixels.reshape(batch, c, height, width)
        return grad_feature.view(batch, channels, height, width), grad_selected, grad_residual, None, None


def select_and_inject(
    feature: torch.Tensor,
    selected: torch.Tensor,
    residual: torch.Tensor,
    head_channels: int,
    leak_choice: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the selected image (B, C_img, h, w) and the next block input (B, C, h, w).

    image = selected @ feature[:, :head_channels] + residual per sample; the next input is the
    feature with the image added to channels 0..C_img-1 and, with leak choice, the leak
    (selected @ the other channels) added to the last C_img channels. selected: (B, C_img, Ch).
    """
    residual = residual.to(feature.dtype)
    selected = selected.to(feature.dtype)
    return _SelectInject.apply(feature, selected, residual, head_channels, leak_choice)
