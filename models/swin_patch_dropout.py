"""Structured PatchDropout for timm's ``SwinTransformer`` (Liu et al., arXiv 2208.07220, Sec. 4;
reference repo yueliukth/PatchDropout ``timm_swin.py``).

timm's Swin has no ``patch_drop`` slot. Swin attends inside ``W x W`` windows (``W = 7``), so
dropping arbitrary tokens would break the grid. The paper keeps the grid instead:

1. after the patch embedding, per image draw ``n = max(1, int(keep_rate * W))`` rows and ``n``
   columns of the window, uniformly without replacement, sorted;
2. keep the ``n x n`` intersection in *every* window and reassemble the grid, so a
   ``(H, W)`` patch grid becomes ``(H/W * n, W/W * n)`` and each stage holds ``(n/W)^2`` of its
   tokens;
3. every later block runs with window ``n`` (shift ``n // 2`` in shifted blocks) and its
   relative-position bias is gathered at the kept positions: a kept token keeps the row and
   column it had inside its original window, so the bias between two kept tokens is the bias
   of their original offset (as in the reference, the same positions serve every stage).

Rules where the paper is silent or the reference is not sound (documented in docs/vision.md):

* Shifted-window mask: built for the kept grid (window ``n``, shift ``n // 2``) with Swin's own
  region rule, so tokens that the cyclic shift wraps around the border never attend to each
  other. The reference instead rolls by the original shift (3) and gathers the original 7x7
  mask at the kept positions, which marks the wrong tokens as wrapped once ``n < 7``.
* Stages whose kept map is smaller than ``n`` (small images, odd sizes that timm's
  ``PatchMerging`` pads) use a window equal to the whole map, like timm, with dense positions
  ``0..w-1`` in the table of that block; such blocks have one window and no shift.
* The patch grid must be a multiple of the window size (224 -> 56 = 8 x 7, 448 -> 112).

At keep rate 1.0, and always in eval mode, the model runs timm's own forward unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple
from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
from torch import nn
from typing_extensions import override

from models.patch_dropout import KeepRateSchedule, check_keep_rate, sample_keep_rate


def kept_window_size(keep_rate: float, window: int) -> int:
    """Rows (and columns) kept per window: ``max(1, int(keep_rate * window))``."""
    return max(1, int(keep_rate * window))


def sample_rows_cols(
    batch: int, window: int, n: int, device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, ``n`` sorted rows and ``n`` sorted columns out of ``window``: two ``(B, n)``."""
    # `generator` only when given: torch.rand(..., generator=None) fails with a symbolic batch
    # size under torch.compile(dynamic=True)
    extra = {} if generator is None else {"generator": generator}
    rows = torch.rand(batch, window, device=device, **extra).topk(n, dim=1).indices
    cols = torch.rand(batch, window, device=device, **extra).topk(n, dim=1).indices
    return rows.sort(dim=1).values, cols.sort(dim=1).values


def kept_positions(rows: torch.Tensor, cols: torch.Tensor, grid: tuple[int, int], window: int) -> torch.Tensor:
    """Flat indices ``(B, Hk * Wk)`` into the ``grid`` (raster order) of the kept tokens.

    Kept grid row ``g`` is original row ``(g // n) * window + rows[g % n]``; likewise columns.
    """
    height, width = grid
    n = rows.shape[1]
    win_r = torch.arange(height // window, device=rows.device)
    win_c = torch.arange(width // window, device=rows.device)
    orig_r = (win_r[None, :, None] * window + rows[:, None, :]).flatten(1)  # (B, Hk)
    orig_c = (win_c[None, :, None] * window + cols[:, None, :]).flatten(1)  # (B, Wk)
    assert orig_r.shape[1] == height // window * n
    return (orig_r[:, :, None] * width + orig_c[:, None, :]).flatten(1)


def drop_rows_cols(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, window: int) -> torch.Tensor:
    """Keep the ``rows x cols`` intersection of every window of ``x`` ``(B, H, W, C)``.

    Returns ``(B, H/window * n, W/window * n, C)``.
    """
    batch, height, width, chans = x.shape
    n = rows.shape[1]
    idx = kept_positions(rows, cols, (height, width), window)
    kept = x.reshape(batch, height * width, chans).gather(1, idx.unsqueeze(-1).expand(-1, -1, chans))
    return kept.view(batch, height // window * n, width // window * n, chans)


def relative_position_index(rows: torch.Tensor, cols: torch.Tensor, table_window: tuple[int, int]) -> torch.Tensor:
    """Index ``(B, N, N)`` into a ``(2Wh-1)(2Ww-1)`` bias table for tokens at window coordinates
    ``rows x cols`` (raster order, ``N = len(rows) * len(cols)``); timm's formula, gathered."""
    batch, nr, nc = rows.shape[0], rows.shape[1], cols.shape[1]
    th, tw = table_window
    r = rows[:, :, None].expand(batch, nr, nc).reshape(batch, nr * nc)
    c = cols[:, None, :].expand(batch, nr, nc).reshape(batch, nr * nc)
    dr = r[:, :, None] - r[:, None, :] + (th - 1)
    dc = c[:, :, None] - c[:, None, :] + (tw - 1)
    return dr * (2 * tw - 1) + dc


def shifted_window_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                        device: torch.device) -> torch.Tensor:
    """Swin's shifted-window mask ``(nW, N, N)`` (0 / -100) for a padded ``height x width`` map:
    tokens from different regions of the cyclically shifted map must not attend to each other."""
    region = torch.zeros(height, width, device=device)
    count = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            region[hs, ws] = count
            count += 1
    ids = region.view(height // window[0], window[0], width // window[1], window[1])
    ids = ids.permute(0, 2, 1, 3).reshape(-1, window[0] * window[1])
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


def window_block_forward(block: nn.Module, x: torch.Tensor, window: tuple[int, int], shift: tuple[int, int],
                         rel_index: torch.Tensor) -> torch.Tensor:
    """One timm ``SwinTransformerBlock`` on ``x`` ``(B, H, W, C)`` with the given window, shift
    and per-image relative-position index ``(B or 1, N, N)``; mirrors timm's block forward."""
    batch, height, width, chans = x.shape
    attn = block.attn
    h = block.norm1(x)
    if any(shift):
        h = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h = (window[0] - height % window[0]) % window[0]
    pad_w = (window[1] - width % window[1]) % window[1]
    h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = height + pad_h, width + pad_w
    nh, nw, area = hp // window[0], wp // window[1], window[0] * window[1]
    windows = window_partition(h, window).view(batch * nh * nw, area, chans)

    heads = attn.num_heads
    qkv = attn.qkv(windows).reshape(windows.shape[0], area, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B*nW, heads, N, head_dim)
    table = attn.relative_position_bias_table  # ((2Wh-1)(2Ww-1), heads)
    bias = table[rel_index.reshape(-1)].view(*rel_index.shape, heads).permute(0, 3, 1, 2)  # (B|1, h, N, N)
    bias = bias.unsqueeze(1)  # (B|1, 1, h, N, N): the same bias in every window of an image
    if any(shift):
        bias = bias + shifted_window_mask(hp, wp, window, shift, x.device).to(bias.dtype)[None, :, None]
    bias = bias.expand(batch, nh * nw, heads, area, area).reshape(-1, heads, area, area)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias.to(q.dtype), scale=attn.scale,
        dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(windows.shape[0], area, -1)))

    out = window_reverse(out.view(-1, *window, chans), window, hp, wp)[:, :height, :width]
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
    x = x + block.drop_path1(out)
    x = x.reshape(batch, -1, chans)
    x = x + block.drop_path2(block.mlp(block.norm2(x)))
    return x.reshape(batch, height, width, chans)


def swin_features_dropped(model: SwinTransformer, images: torch.Tensor, rows: torch.Tensor,
                          cols: torch.Tensor) -> torch.Tensor:
    """timm Swin ``forward_features`` keeping only ``rows x cols`` of every window.

    Returns the normed NHWC feature map ``(B, h, w, C)`` of the last stage; with ``rows`` and
    ``cols`` equal to ``0..W-1`` the result is timm's (up to float rounding).
    """
    window = to_2tuple(model.layers[0].blocks[0].window_size)[0]
    x = model.patch_embed(images)  # (B, H, W, C)
    x = drop_rows_cols(x, rows, cols, window)
    n = rows.shape[1]
    batch = x.shape[0]
    stage_tokens = []
    for stage in model.layers:
        x = stage.downsample(x)
        height, width = x.shape[1:3]
        stage_tokens.append(height * width)
        win = (min(n, height), min(n, width))
        index_cache: dict[tuple[int, int], torch.Tensor] = {}
        for block in stage.blocks:
            table = to_2tuple(block.attn.window_size)
            if table not in index_cache:
                # Sampled window coordinates where the block's own window is the sampling window
                # and the kept window is full size; dense coordinates in a clipped single window.
                r = rows if (win[0] == n and table[0] == window) else \
                    torch.arange(win[0], device=x.device).expand(batch, -1)
                c = cols if (win[1] == n and table[1] == window) else \
                    torch.arange(win[1], device=x.device).expand(batch, -1)
                index_cache[table] = relative_position_index(r, c, table)
            shifted = any(to_2tuple(block.shift_size))
            shift = (win[0] // 2 if shifted and height > win[0] else 0,
                     win[1] // 2 if shifted and width > win[1] else 0)
            x = window_block_forward(block, x, win, shift, index_cache[table])
    if not torch.compiler.is_compiling():
        model.patch_drop.last_stage_tokens = stage_tokens
    return model.norm(x)


class SwinPatchDropout(nn.Module):
    """Keep-rate state of a Swin with PatchDropout (no parameters, so checkpoints stay timm's).

    Args:
        keep_rate: row/column keep rate per window at train time; ``n = max(1, int(keep * W))``.
        schedule: ``"fixed"`` or ``"random"`` (reference per-step random keep rate).
        window: the first stage's window size ``W``.
    """

    def __init__(self, keep_rate: float = 0.5, schedule: KeepRateSchedule = "fixed", window: int = 7) -> None:
        super().__init__()
        check_keep_rate(keep_rate, schedule)
        self.keep_rate = keep_rate
        self.schedule = schedule
        self.window = window
        self.last_keep_rate = 1.0
        self.last_tokens: int | None = None
        self.last_stage_tokens: list[int] = []
        self.step_keep_rate: float | None = None

    def draw(self) -> float:
        """Fix the next training forwards' keep rate (the schedule's draw) and return it; see
        :meth:`models.patch_dropout.PatchDropout.draw` (call it outside a compiled region)."""
        rate = sample_keep_rate() if self.schedule == "random" else self.keep_rate
        self.step_keep_rate = rate
        return rate

    def sample(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows and columns for this training step, or ``None`` when every position is kept."""
        if torch.compiler.is_compiling():  # traced: the rate was drawn outside (see `draw`)
            rate = self.keep_rate if self.step_keep_rate is None else self.step_keep_rate
        else:
            rate = self.step_keep_rate if self.step_keep_rate is not None else \
                (sample_keep_rate() if self.schedule == "random" else self.keep_rate)
            self.last_keep_rate = rate
        n = kept_window_size(rate, self.window)
        if n >= self.window:
            return None
        return sample_rows_cols(batch, self.window, n, device)

    @override
    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, schedule={self.schedule!r}, window={self.window}"


class PatchDropoutSwinTransformer(SwinTransformer):
    """timm ``SwinTransformer`` whose training forward applies :class:`SwinPatchDropout`.

    Not built directly: :func:`install_swin_patch_dropout` turns a built timm Swin into one, so
    any timm Swin name, size or checkpoint works and the state dict is unchanged.
    """

    patch_drop: SwinPatchDropout

    @override
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        selection = self.patch_drop.sample(x.shape[0], x.device) if self.training else None
        traced = torch.compiler.is_compiling()  # no bookkeeping in a compiled graph
        if selection is None:
            if not traced:
                patch = to_2tuple(self.patch_embed.patch_size)
                self.patch_drop.last_tokens = (x.shape[-2] // patch[0]) * (x.shape[-1] // patch[1])
            return super().forward_features(x)
        out = swin_features_dropped(self, x, *selection)
        if not traced:
            self.patch_drop.last_tokens = self.patch_drop.last_stage_tokens[0]
        return out


def install_swin_patch_dropout(model: nn.Module, keep_rate: float,
                               schedule: KeepRateSchedule = "fixed") -> SwinPatchDropout:
    """Give a built timm ``SwinTransformer`` structured PatchDropout (in place); returns the layer."""
    if not isinstance(model, SwinTransformer):
        raise ValueError(f"backbone: Swin PatchDropout needs a timm SwinTransformer, got {type(model).__name__}")
    window = to_2tuple(model.layers[0].blocks[0].window_size)
    grid = tuple(model.patch_embed.grid_size)
    layer = SwinPatchDropout(keep_rate, schedule, window[0])  # checks the keep rate first
    if window[0] != window[1]:
        raise ValueError(f"backbone: Swin PatchDropout needs square windows, got {window}")
    if grid[0] % window[0] or grid[1] % window[1]:
        raise ValueError(
            f"img_size: the patch grid {grid} must be a multiple of the window size {window[0]} for "
            f"Swin PatchDropout; use e.g. img_size {window[0] * math.ceil(grid[0] / window[0]) * 4} "
            "for patch size 4")
    model.__class__ = PatchDropoutSwinTransformer
    model.patch_drop = layer
    return layer
