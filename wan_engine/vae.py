"""The Wan 2.1 video VAE: a causal 3D-conv autoencoder, 16-channel latent, 8x spatial / 4x temporal.

Used by the A14B models (T2V decode, I2V image conditioning). Parameter names follow the official
`Wan2.1_VAE.pth` so it loads strictly without remapping. Video is processed causally in chunks
(frame 0, then groups of 4 frames to encode; one latent frame at a time to decode) with each temporal
conv carrying its trailing input frames to the next chunk: this bounds memory for long videos and is
what the released weights expect. Frame 0 is special: the temporal down/up-sampling is skipped on the
first chunk, so frame 0 maps to latent frame 0 alone.
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
ENCODE_CHUNK = 4  # video frames per encoder chunk after the lone first frame


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
    `first` is true while the first chunk (video frame 0 / latent frame 0) runs.
    """

    first: bool = True
    tails: dict[nn.Module, Tensor] = field(default_factory=dict)


class CausalConv3d(nn.Conv3d):
    """3D conv that sees only current and past frames: the temporal context comes from the previous
    chunk's tail, or zeros before the first frame; spatial padding is symmetric."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int]):
        kt, kh, kw = kernel
        super().__init__(in_dim, out_dim, kernel, padding=(0, kh // 2, kw // 2))
        self.context = kt - 1

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        tail = state.tails.get(self)
        if tail is not None:
            x = torch.cat([tail, x], dim=2)  # [B, C, t + T, H, W]
        # Clone: the tail must not keep the whole chunk alive until the next one.
        state.tails[self] = x[:, :, -self.context:].clone()
        missing = self.context + (0 if tail is None else -tail.shape[2])
        if missing > 0:
            x = F.pad(x, (0, 0, 0, 0, missing, 0))  # [B, C, context + T, H, W]
        return super().forward(x)  # [B, C', T, H, W]


class RMSNorm(nn.Module):
    """Unit L2 norm over channels rescaled by sqrt(C), times a learned per-channel gain."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def _per_frame(fn, x: Tensor) -> Tensor:
    """Apply a 2D (image) op to every frame of [B, C, T, H, W]."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # [B*T, C', H', W']
    return y.unflatten(0, (b, t)).transpose(1, 2)  # [B, C', T, H', W']


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
        h = conv1(F.silu(norm1(x)), state)  # [B, out, T, H, W]
        h = conv2(F.silu(norm2(h)), state)  # [B, out, T, H, W]
        return h + self.shortcut(x)


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def _attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2)  # [N, H*W, 3C]
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # [N, 1, H*W, C] each
        y = F.scaled_dot_product_attention(q, k, v)  # [N, 1, H*W, C]
        return self.proj(y.squeeze(1).transpose(1, 2).reshape(n, c, h, w))  # [N, C, H, W]

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        return x + _per_frame(self._attend, x)


class Downsample(nn.Module):
    """Halve H and W; with `temporal`, also halve the frames after frame 0 (stride-2 causal conv)."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # Pad right/bottom only, so a 3x3 stride-2 conv keeps pixel (0, 0) aligned.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        x = _per_frame(self.resample, x)  # [B, C, T, H/2, W/2]
        if self.time_conv is None:
            return x
        tail = state.tails.get(self)
        state.tails[self] = x[:, :, -1:].clone()
        if state.first:
            return x  # frame 0 stays its own latent frame
        return self.time_conv(torch.cat([tail, x], dim=2))  # [B, C, T/2, H/2, W/2]


class Upsample(nn.Module):
    """Double H and W (halving channels); with `temporal`, also double every frame after frame 0."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        # Predicts both output frames of each input frame as two channel groups.
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        # On the first chunk the time conv is skipped, so its context starts at latent frame 1.
        if self.time_conv is not None and not state.first:
            b, c, t, h, w = x.shape
            x = self.time_conv(x, state)  # [B, 2C, T, H, W]
            x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        return _per_frame(self.resample, x)  # [B, C/2, T', 2H, 2W]


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
        x = self.conv1(x, state)  # [B, dim, T, H, W]
        for block in (*self.downsamples, *self.middle):
            x = block(x, state)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), state)  # [B, out_dim, T', H/8, W/8]


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
        x = self.conv1(x, state)  # [B, 4*dim, 1, h, w]
        for block in (*self.middle, *self.upsamples):
            x = block(x, state)
        norm, _, conv = self.head
        return conv(F.silu(norm(x)), state)  # [B, 3, 1 or 4, 8h, 8w]


class WanVAE21(nn.Module):
    """Wan 2.1 VAE: video [B, 3, 1 + 4k, H, W] in [-1, 1] <-> normalised latent [B, 16, 1 + k, H/8, W/8]."""

    def __init__(self, dim: int = 96, z_dim: int = 16):
        super().__init__()
        if z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(LATENT_MEAN)}: the published latent statistics are for it")
        self.z_dim = z_dim
        self.encoder = Encoder(dim, z_dim * 2)
        self.conv1 = nn.Conv3d(z_dim * 2, z_dim * 2, 1)  # -> (mu, log_var)
        self.conv2 = nn.Conv3d(z_dim, z_dim, 1)
        self.decoder = Decoder(dim, z_dim)

    @staticmethod
    def dim_from_state_dict(sd: dict[str, Tensor]) -> int:
        return sd["encoder.conv1.weight"].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k -> (mu - mean) / std as [B, 16, 1 + k, H/8, W/8]."""
        frames = video.shape[2]
        if video.dim() != 5 or video.shape[1] != 3 or frames % ENCODE_CHUNK != 1:
            raise ValueError(f"video must be [B, 3, 1 + 4k, H, W], got {tuple(video.shape)}")
        video = video.to(self.dtype)
        state = ChunkState()
        chunks = [self.encoder(video[:, :, :1], state)]  # [B, 2*z, 1, h, w]
        state.first = False
        for start in range(1, frames, ENCODE_CHUNK):
            chunks.append(self.encoder(video[:, :, start:start + ENCODE_CHUNK], state))
        mu = self.conv1(torch.cat(chunks, dim=2))[:, : self.z_dim]  # [B, z, 1 + k, h, w]
        mean, std = _latent_stats(mu.device, mu.dtype)
        return (mu - mean) / std

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent [B, 16, f, h, w] -> video [B, 3, 1 + 4(f - 1), 8h, 8w] clamped to [-1, 1]."""
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"latent must be [B, {self.z_dim}, f, h, w], got {tuple(z.shape)}")
        z = z.to(self.dtype)
        mean, std = _latent_stats(z.device, z.dtype)
        x = self.conv2(z * std + mean)  # [B, z, f, h, w]
        state = ChunkState()
        chunks = []
        for i in range(x.shape[2]):
            chunks.append(self.decoder(x[:, :, i:i + 1], state))  # [B, 3, 1 or 4, 8h, 8w]
            state.first = False
        return torch.cat(chunks, dim=2).clamp_(-1, 1)
