"""The Wan 2.1 video VAE: a causal 3D-conv autoencoder, 16-channel latent, 8x spatial / 4x temporal.

Used by the A14B models (T2V decode, I2V image conditioning). Parameter names follow the official
`Wan2.1_VAE.pth` so it loads strictly without remapping. Video is processed causally in chunks, each
temporal conv carrying its trailing input frames to the next chunk: this bounds memory for long
videos and is what the released weights expect. Frame 0 is special: the temporal down/up-sampling is
skipped on the first chunk, so frame 0 maps to latent frame 0 alone. After it, a causal pass is the
same whatever the chunk length, so encode takes groups of 4 frames (as the official code) and decode
takes as many latent frames as `decode_chunk_bytes` allows (the official code decodes one at a time).

Activations are channels-last ([B, T, H, W, C] in memory): convolutions then run on tensor-core
kernels without layout copies, and the channel RMS norm is a contiguous last-dim reduction. Decode
runs in float32 by default; `decode_dtype` (or `decode(z, dtype=...)`) runs its convolutions and
attention in bfloat16 instead while norms and the residual stream stay float32: 0.44x the official
decode time, within about 1e-2 of the float32 video (docs/benchmarks.md).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Published per-channel statistics of the 16-channel latent (Wan 2.1 release).
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
TEMPORAL_DOWN = (False, True, True)  # per encoder stage transition; the decoder mirrors it
TIME_STRIDE = 4  # video frames per latent frame after frame 0 (= the encoder's chunk)
SPACE_STRIDE = 8
# Last-stage activations (in the weights' dtype) alive at once while decoding (block input, padded
# conv input, norm output, conv output, the upsampler's input and output): sizes a decode chunk.
LIVE_TENSORS = 5
DEFAULT_DECODE_CHUNK_BYTES = 6 << 30


@functools.cache
def _latent_stats(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Latent mean and std as [1, 16, 1, 1, 1], made on first use so a meta-built model needs no data."""
    mean = torch.tensor(LATENT_MEAN, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    return mean, std


@dataclass
class ChunkState:
    """What one encode/decode call carries from chunk to chunk.

    `tails` maps each temporal conv (or temporal resampler) to the last input frames it saw;
    `first` is true while the first chunk (video frame 0 / latent frame 0) runs; `dtype` is what the
    convolutions run in. Activations between blocks (the residual stream) keep the input's dtype.
    """

    dtype: torch.dtype
    first: bool = True
    tails: dict[nn.Module, Tensor] = field(default_factory=dict)


def _conv(conv: nn.Conv2d | nn.Conv3d, x: Tensor, dtype: torch.dtype) -> Tensor:
    """Run `conv` in `dtype` with channels-last weights; the output stays in `dtype`. Casting the
    weights per call costs a few MB of traffic and keeps no second copy that could go stale."""
    layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    weight = conv.weight.to(dtype, memory_format=layout)
    bias = None if conv.bias is None else conv.bias.to(dtype)
    return conv._conv_forward(x.to(dtype), weight, bias)


class CausalConv3d(nn.Conv3d):
    """3D conv that sees only current and past frames: the temporal context comes from the previous
    chunk's tail, or zeros before the first frame; spatial padding is symmetric."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int]):
        kt, kh, kw = kernel
        super().__init__(in_dim, out_dim, kernel, padding=(0, kh // 2, kw // 2))
        self.context = kt - 1

    def forward(self, x: Tensor, state: ChunkState, norm: RMSNorm | None = None) -> Tensor:
        """Convolve `x`, or SiLU(norm(x)) when `norm` is given, in `state.dtype`. Either is written
        straight into the padded input buffer, which saves the copy a concatenation with the tail
        would make; the norm reads `x` in its own dtype."""
        b, c, t, h, w = x.shape
        padded = torch.empty((b, c, self.context + t, h, w), dtype=state.dtype, device=x.device,
                             memory_format=torch.channels_last_3d)  # [B, C, context + T, H, W]
        tail = state.tails.get(self)
        if tail is None:
            padded[:, :, :self.context].zero_()
        else:
            padded[:, :, :self.context].copy_(tail)
        new = padded[:, :, self.context:]
        if norm is None:
            new.copy_(x)
        elif x.dtype == state.dtype:
            torch.ops.aten.silu.out(norm(x), out=new)
        else:  # silu.out cannot cast
            new.copy_(F.silu(norm(x), inplace=True))
        # Clone: the tail must not keep the whole chunk alive until the next one. Before frame 0 it
        # holds zeros, as the official cache is zero-padded.
        state.tails[self] = padded[:, :, -self.context:].clone()
        return _conv(self, padded, state.dtype)  # [B, C', T, H, W]


class RMSNorm(nn.Module):
    """Unit L2 norm over channels rescaled by sqrt(C), times a learned per-channel gain."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        # x / |x| * sqrt(C) is x / rms(x); the eps stands for F.normalize's 1e-12 floor on |x|.
        c = x.shape[1]
        y = F.rms_norm(x.movedim(1, -1), (c,), self.gamma.flatten().to(x.dtype), eps=1e-24 / c)  # [B, ..., C]
        return y.movedim(-1, 1)


def _per_frame(fn, x: Tensor) -> Tensor:
    """Apply a 2D (image) op to every frame of [B, C, T, H, W] (a view for channels-last input)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # [B*T, C', H', W']
    return y.unflatten(0, (b, t)).transpose(1, 2)  # [B, C', T, H', W']


def _interleave_pairs(x: Tensor) -> Tensor:
    """[B, 2C, T, H, W] holding two output frames per input frame as channel halves ->
    [B, C, 2T, H, W], channels-last."""
    b, c2, t, h, w = x.shape
    c = c2 // 2
    out = torch.empty((b, t, 2, h, w, c), dtype=x.dtype, device=x.device)
    out.copy_(x.view(b, 2, c, t, h, w).permute(0, 3, 1, 4, 5, 2))  # [B, T, 2, H, W, C]
    return out.view(b, 2 * t, h, w, c).permute(0, 4, 1, 2, 3)  # [B, C, 2T, H, W]


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Official layout: norm, SiLU, conv, norm, SiLU, dropout, conv (indices name the parameters).
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3), nn.SiLU(), CausalConv3d(in_dim, out_dim, (3, 3, 3)),
            RMSNorm(out_dim, 3), nn.SiLU(), nn.Identity(), CausalConv3d(out_dim, out_dim, (3, 3, 3)),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        norm1, _, conv1, norm2, _, _, conv2 = self.residual
        h = conv1(x, state, norm=norm1)  # [B, out, T, H, W]
        h = conv2(h, state, norm=norm2)  # [B, out, T, H, W]
        if isinstance(self.shortcut, nn.Identity):
            return torch.add(x, h)  # in x's dtype: the residual stream keeps its precision
        return h.to(x.dtype).add_(_conv(self.shortcut, x, state.dtype))


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        n, c, h, w = x.shape
        qkv = _conv(self.to_qkv, self.norm(x), dtype).flatten(2).transpose(1, 2)  # [N, H*W, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # [N, 1, H*W, C] each
        y = F.scaled_dot_product_attention(q, k, v)  # [N, 1, H*W, C]
        return _conv(self.proj, y.squeeze(1).transpose(1, 2).reshape(n, c, h, w), dtype)  # [N, C, H, W]

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        return x + _per_frame(lambda f: self._attend(f, state.dtype), x)


class Downsample(nn.Module):
    """Halve H and W; with `temporal`, also halve the frames after frame 0 (stride-2 causal conv)."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # Pad right/bottom only, so a 3x3 stride-2 conv keeps pixel (0, 0) aligned.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        pad, conv = self.resample
        y = _per_frame(lambda f: _conv(conv, pad(f), state.dtype), x)  # [B, C, T, H/2, W/2]
        if self.time_conv is None:
            return y.to(x.dtype)
        tail = state.tails.get(self)
        state.tails[self] = y[:, :, -1:].clone()
        if state.first:
            return y.to(x.dtype)  # frame 0 stays its own latent frame
        return _conv(self.time_conv, torch.cat([tail, y], dim=2), state.dtype).to(x.dtype)  # [B, C, T/2, H/2, W/2]


class Upsample(nn.Module):
    """Double H and W (to `out_dim` channels, default half of `dim` as in the 2.1 VAE); with `temporal`, also
    double every frame after frame 0."""

    def __init__(self, dim: int, temporal: bool, out_dim: int | None = None):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
            nn.Conv2d(dim, dim // 2 if out_dim is None else out_dim, 3, padding=1),
        )
        # Predicts both output frames of each input frame as two channel groups.
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        # On the first chunk the time conv is skipped, so its context starts at latent frame 1.
        y = x
        if self.time_conv is not None and not state.first:
            y = _interleave_pairs(self.time_conv(x, state))  # [B, C, 2T, H, W]
        up, conv = self.resample
        y = _per_frame(lambda f: _conv(conv, up(f.to(state.dtype)), state.dtype), y)  # [B, C/2, T', 2H, 2W]
        return y.to(x.dtype)


class Encoder(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        dims = [dim * m for m in (1, *DIM_MULT)]
        self.conv1 = CausalConv3d(3, dims[0], (3, 3, 3))
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for j in range(NUM_RES_BLOCKS):
                blocks.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i < len(DIM_MULT) - 1:
                blocks.append(Downsample(d_out, TEMPORAL_DOWN[i]))
        self.downsamples = nn.Sequential(*blocks)
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d), FrameAttention(d), ResidualBlock(d, d))
        self.head = nn.Sequential(RMSNorm(d, 3), nn.SiLU(), CausalConv3d(d, out_dim, (3, 3, 3)))

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        x = self.conv1(x, state).to(x.dtype)  # [B, dim, T, H, W]
        for block in (*self.downsamples, *self.middle):
            x = block(x, state)
        norm, _, conv = self.head
        return conv(x, state, norm=norm)  # [B, out_dim, T', H/8, W/8]


class Decoder(nn.Module):
    def __init__(self, dim: int, z_dim: int):
        super().__init__()
        dims = [dim * m for m in (DIM_MULT[-1], *reversed(DIM_MULT))]
        temporal_up = tuple(reversed(TEMPORAL_DOWN))
        self.conv1 = CausalConv3d(z_dim, dims[0], (3, 3, 3))
        d = dims[0]
        self.middle = nn.Sequential(ResidualBlock(d, d), FrameAttention(d), ResidualBlock(d, d))
        blocks: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            d_in = d_in if i == 0 else d_in // 2  # each Upsample halves the channels
            for j in range(NUM_RES_BLOCKS + 1):
                blocks.append(ResidualBlock(d_in if j == 0 else d_out, d_out))
            if i < len(DIM_MULT) - 1:
                blocks.append(Upsample(d_out, temporal_up[i]))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3, (3, 3, 3)))

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        x = self.conv1(x, state).to(x.dtype)  # [B, 4*dim, t, h, w]
        for block in (*self.middle, *self.upsamples):
            x = block(x, state)
        norm, _, conv = self.head
        return conv(x, state, norm=norm)  # [B, 3, 1 or 4t, 8h, 8w]


class WanVAE21(nn.Module):
    """Wan 2.1 VAE: video [B, 3, 1 + 4k, H, W] in [-1, 1] <-> normalised latent [B, 16, 1 + k, H/8, W/8].

    `decode_dtype`: the dtype decode convolves in when its call names none (None: the weights' dtype,
    float32 as released); bfloat16 takes ~0.6x the float32 time, within about 1e-2 of its result.
    `decode_chunk_bytes`: the activation memory one decode chunk may take, which sets how many latent
    frames go through the decoder together (at least one).
    """

    def __init__(self, dim: int = 96, z_dim: int = 16):
        super().__init__()
        if z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(LATENT_MEAN)}: the published latent statistics are for it")
        self.dim = dim
        self.z_dim = z_dim
        self.encoder = Encoder(dim, z_dim * 2)
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(dim, z_dim)
        self.decode_dtype: torch.dtype | None = None
        self.decode_chunk_bytes = DEFAULT_DECODE_CHUNK_BYTES

    @staticmethod
    def dim_from_state_dict(sd: dict[str, Tensor]) -> int:
        return sd["encoder.conv1.weight"].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> (mu - mean) / std as [B, 16, 1 + k, H/8, W/8]."""
        frames = video.shape[2]
        if video.dim() != 5 or video.shape[1] != 3 or frames % TIME_STRIDE != 1:
            raise ValueError(f"video must be [B, 3, 1 + 4k, H, W], got {tuple(video.shape)}")
        video = video.to(self.dtype)
        state = ChunkState(self.dtype)
        chunks = [self.encoder(video[:, :, :1], state)]  # [B, 2*z, 1, h, w]
        state.first = False
        for start in range(1, frames, TIME_STRIDE):
            chunks.append(self.encoder(video[:, :, start:start + TIME_STRIDE], state))
        mu = self.conv1(torch.cat(chunks, dim=2))[:, : self.z_dim]  # [B, z, 1 + k, h, w]
        mean, std = _latent_stats(mu.device, mu.dtype)
        return ((mu - mean) / std).contiguous()

    def decode_frames_per_chunk(self, h: int, w: int) -> int:
        """Latent frames of an h x w latent that one decode chunk takes within `decode_chunk_bytes`."""
        per_frame = LIVE_TENSORS * TIME_STRIDE * SPACE_STRIDE**2 * h * w * self.dim * self.dtype.itemsize
        return max(1, self.decode_chunk_bytes // per_frame)

    def decode(self, z: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Normalised latent [B, 16, f, h, w] -> video [B, 3, 1 + 4(f - 1), 8h, 8w] clamped to [-1, 1],
        in the weights' dtype. `dtype` (default `decode_dtype`, else the weights' dtype) is what the
        convolutions and attention run in; norms and residual sums stay in the weights' dtype."""
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"latent must be [B, {self.z_dim}, f, h, w], got {tuple(z.shape)}")
        b, _, f, h, w = z.shape
        z = z.to(self.dtype)
        mean, std = _latent_stats(z.device, z.dtype)
        x = self.conv2(z * std + mean).contiguous(memory_format=torch.channels_last_3d)  # [B, z, f, h, w]
        video = torch.empty((b, 3, 1 + TIME_STRIDE * (f - 1), SPACE_STRIDE * h, SPACE_STRIDE * w),
                            dtype=self.dtype, device=z.device)  # [B, 3, F, H, W]
        state = ChunkState(dtype or self.decode_dtype or self.dtype)
        video[:, :, :1] = self.decoder(x[:, :, :1], state)  # frame 0 alone: no temporal upsampling
        state.first = False
        step = self.decode_frames_per_chunk(h, w)
        for start in range(1, f, step):
            stop = min(start + step, f)
            frames = slice(1 + TIME_STRIDE * (start - 1), 1 + TIME_STRIDE * (stop - 1))
            video[:, :, frames] = self.decoder(x[:, :, start:stop], state)  # [B, 3, 4 * (stop - start), H, W]
        return video.clamp_(-1, 1)
