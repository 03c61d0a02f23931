"""The Wan 2.2 video VAE of TI2V-5B: 48-channel latent, 16x spatial / 4x temporal.

It packs each 2x2 pixel block into channels first (12 channels; the width offset before the height
offset, as the released weights expect), then runs a causal 3D-conv autoencoder of the 2.1 kind at 8x
on the packed frames. Two things are new against the 2.1 VAE (`wan_engine.vae`, whose blocks this one
reuses): every resolution stage has a parameter-free shortcut around it (an average of the channel and
pixel groups going down, their repetition going up), and the up-samplers keep their channel count.
Parameter names follow the official `Wan2.2_VAE.pth`, so it loads strictly without remapping.

Chunking is the 2.1 VAE's: frame 0 alone, then groups of 4 frames to encode; latent frame 0 alone, then as
many latent frames per chunk as `decode_chunk_bytes` allows to decode (a causal pass after frame 0 does not
depend on the chunk length). On the first decode chunk the up-shortcut drops the frames a temporal
up-sampler would have made before frame 0. `decode(z, dtype=torch.bfloat16)` (or `decode_dtype`) runs the
convolutions and attention in bf16 with float32 norms and residual stream, as the 2.1 VAE does.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from .vae import (
    LIVE_TENSORS,
    NUM_RES_BLOCKS,
    CausalConv3d,
    ChunkState,
    Downsample,
    FrameAttention,
    ResidualBlock,
    RMSNorm,
    Upsample,
)

# Published per-channel statistics of the 48-channel latent (Wan 2.2 release).
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

Z_DIM = 48
DIM_MULT = (1, 2, 4, 4)
TEMPORAL_DOWN = (False, True, True)   # per encoder stage; the decoder mirrors it
PATCH = 2                              # pixels per side packed into channels before the encoder
TIME_STRIDE = 4
SPACE_STRIDE = 16
DEFAULT_DECODE_CHUNK_BYTES = 6 << 30


@functools.cache
def _latent_stats(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Latent mean and 1/std as [1, 48, 1, 1, 1]; the official code keeps the reciprocal (in float32) and
    multiplies by it, so the same rounding is kept here."""
    mean = torch.tensor(LATENT_MEAN, dtype=torch.float32).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENT_STD, dtype=torch.float32).view(1, -1, 1, 1, 1)
    return mean.to(device, dtype), inv_std.to(device, dtype)


def pack_pixels(video: Tensor) -> Tensor:
    """[B, C, T, 2H, 2W] -> [B, 4C, T, H, W]: channel index c*4 + 2*r + q for the pixel (2h + q, 2w + r)."""
    b, c, t, h2, w2 = video.shape
    x = video.reshape(b, c, t, h2 // PATCH, PATCH, w2 // PATCH, PATCH)   # [B, C, T, H, q, W, r]
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * PATCH * PATCH, t, h2 // PATCH, w2 // PATCH)


def unpack_pixels(x: Tensor) -> Tensor:
    """The inverse of `pack_pixels`: [B, 4C, T, H, W] -> [B, C, T, 2H, 2W]."""
    b, c4, t, h, w = x.shape
    x = x.reshape(b, c4 // (PATCH * PATCH), PATCH, PATCH, t, h, w)     # [B, C, r, q, T, H, W]
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c4 // (PATCH * PATCH), t, h * PATCH, w * PATCH)


def average_down(x: Tensor, out_dim: int, ft: int, fs: int) -> Tensor:
    """The down-stage shortcut: fold each ft x fs x fs block into channels (zero frames in front when the
    frame count is not a multiple of ft) and average consecutive channel groups down to `out_dim`."""
    pad = (-x.shape[2]) % ft
    if pad:
        x = torch.cat([x.new_zeros(*x.shape[:2], pad, *x.shape[3:]), x], dim=2)
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)                                  # [B, C, ft, fs, fs, T', H', W']
    return x.reshape(b, out_dim, -1, t // ft, h // fs, w // fs).mean(dim=2)


def repeat_up(x: Tensor, out_dim: int, ft: int, fs: int, first: bool) -> Tensor:
    """The up-stage shortcut, the mirror of `average_down`: repeat each channel, unfold the copies into
    ft x fs x fs blocks; on the first chunk only the last of the ft frames is kept (frame 0 stays one)."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(out_dim * ft * fs * fs // c, dim=1)
    x = x.reshape(b, out_dim, ft, fs, fs, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)   # [B, C', T, ft, H, fs, W, fs]
    x = x.reshape(b, out_dim, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first else x


class DownStage(nn.Module):
    """Residual blocks then (unless last) a down-sampler, plus the averaging shortcut around them."""

    def __init__(self, in_dim: int, out_dim: int, temporal: bool, down: bool):
        super().__init__()
        blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                   for j in range(NUM_RES_BLOCKS)]
        if down:
            blocks.append(Downsample(out_dim, temporal))
        self.downsamples = nn.Sequential(*blocks)
        self.out_dim = out_dim
        self.ft, self.fs = (2 if temporal else 1), (2 if down else 1)

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        h = x
        for block in self.downsamples:
            h = block(h, state)
        return h + average_down(x, self.out_dim, self.ft, self.fs)


class UpStage(nn.Module):
    """Residual blocks then (unless last) an up-sampler that keeps the channels, plus the repeating
    shortcut around them (not on the last stage)."""

    def __init__(self, in_dim: int, out_dim: int, temporal: bool, up: bool):
        super().__init__()
        blocks: list[nn.Module] = [ResidualBlock(in_dim if j == 0 else out_dim, out_dim)
                                   for j in range(NUM_RES_BLOCKS + 1)]
        if up:
            blocks.append(Upsample(out_dim, temporal, out_dim=out_dim))
        self.upsamples = nn.Sequential(*blocks)
        self.out_dim, self.up = out_dim, up
        self.ft = 2 if temporal else 1

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        h = x
        for block in self.upsamples:
            h = block(h, state)
        if not self.up:
            return h
        return h + repeat_up(x, self.out_dim, self.ft, 2, state.first)


class Encoder22(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        dims = [dim * m for m in (1, *DIM_MULT)]
        self.conv1 = CausalConv3d(3 * PATCH * PATCH, dims[0], (3, 3, 3))
        last = len(DIM_MULT) - 1
        self.downsamples = nn.Sequential(*(
            DownStage(d_in, d_out, i < last and TEMPORAL_DOWN[i], i < last)
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True))))
        d = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(d, d), FrameAttention(d), ResidualBlock(d, d))
        self.head = nn.Sequential(RMSNorm(d, 3), nn.SiLU(), CausalConv3d(d, out_dim, (3, 3, 3)))

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        x = self.conv1(x, state).to(x.dtype)   # [B, dim, T, H, W]
        for block in (*self.downsamples, *self.middle):
            x = block(x, state)
        norm, _, conv = self.head
        return conv(x, state, norm=norm)       # [B, out_dim, T', H/8, W/8]


class Decoder22(nn.Module):
    def __init__(self, dim: int, z_dim: int):
        super().__init__()
        dims = [dim * m for m in (DIM_MULT[-1], *reversed(DIM_MULT))]
        temporal_up = tuple(reversed(TEMPORAL_DOWN))
        last = len(DIM_MULT) - 1
        self.conv1 = CausalConv3d(z_dim, dims[0], (3, 3, 3))
        d = dims[0]
        self.middle = nn.Sequential(ResidualBlock(d, d), FrameAttention(d), ResidualBlock(d, d))
        self.upsamples = nn.Sequential(*(
            UpStage(d_in, d_out, i < last and temporal_up[i], i < last)
            for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True))))
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(),
                                  CausalConv3d(dims[-1], 3 * PATCH * PATCH, (3, 3, 3)))

    def forward(self, x: Tensor, state: ChunkState) -> Tensor:
        x = self.conv1(x, state).to(x.dtype)   # [B, 4*dim, t, h, w]
        for block in (*self.middle, *self.upsamples):
            x = block(x, state)
        norm, _, conv = self.head
        return conv(x, state, norm=norm)       # [B, 12, 1 or 4t, 8h, 8w]


class WanVAE22(nn.Module):
    """Wan 2.2 VAE: video [B, 3, 1 + 4k, H, W] in [-1, 1] <-> normalised latent [B, 48, 1 + k, H/16, W/16].

    `dim` is the encoder's base width (160 as released), `dec_dim` the decoder's (256). `decode_dtype` and
    `decode_chunk_bytes` as for `WanVAE21`."""

    z_dim = Z_DIM
    space_stride = SPACE_STRIDE

    def __init__(self, dim: int = 160, dec_dim: int = 256):
        super().__init__()
        self.dim, self.dec_dim = dim, dec_dim
        self.encoder = Encoder22(dim, Z_DIM * 2)
        self.conv1 = nn.Conv3d(Z_DIM * 2, Z_DIM * 2, 1)   # -> (mu, log_var)
        self.conv2 = nn.Conv3d(Z_DIM, Z_DIM, 1)
        self.decoder = Decoder22(dec_dim, Z_DIM)
        self.decode_dtype: torch.dtype | None = None
        self.decode_chunk_bytes = DEFAULT_DECODE_CHUNK_BYTES

    @staticmethod
    def dims_from_state_dict(sd: dict[str, Tensor]) -> tuple[int, int]:
        """(dim, dec_dim) of a checkpoint: the encoder's first width and a quarter of the decoder's."""
        return sd["encoder.conv1.weight"].shape[0], sd["decoder.conv1.weight"].shape[0] // DIM_MULT[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 16 -> (mu - mean) / std as
        [B, 48, 1 + k, H/16, W/16]."""
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] % TIME_STRIDE != 1 \
                or video.shape[3] % SPACE_STRIDE or video.shape[4] % SPACE_STRIDE:
            raise ValueError(f"video must be [B, 3, 1 + 4k, 16h, 16w], got {tuple(video.shape)}")
        x = pack_pixels(video.to(self.dtype))   # [B, 12, T, H/2, W/2]
        state = ChunkState(self.dtype)
        chunks = [self.encoder(x[:, :, :1], state)]
        state.first = False
        for start in range(1, x.shape[2], TIME_STRIDE):
            chunks.append(self.encoder(x[:, :, start:start + TIME_STRIDE], state))
        mu = self.conv1(torch.cat(chunks, dim=2))[:, :Z_DIM]   # [B, 48, 1 + k, H/16, W/16]
        mean, inv_std = _latent_stats(mu.device, mu.dtype)
        return ((mu - mean) * inv_std).contiguous()

    def decode_frames_per_chunk(self, h: int, w: int) -> int:
        """Latent frames of an h x w latent that one decode chunk takes within `decode_chunk_bytes` (the last
        stage runs at 8x the latent's size, on packed pixels)."""
        per_frame = LIVE_TENSORS * TIME_STRIDE * 64 * h * w * self.dec_dim * self.dtype.itemsize
        return max(1, self.decode_chunk_bytes // per_frame)

    def decode(self, z: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Normalised latent [B, 48, f, h, w] -> video [B, 3, 1 + 4(f - 1), 16h, 16w] clamped to [-1, 1], in
        the weights' dtype; `dtype` as for `WanVAE21.decode`."""
        if z.dim() != 5 or z.shape[1] != Z_DIM:
            raise ValueError(f"latent must be [B, {Z_DIM}, f, h, w], got {tuple(z.shape)}")
        b, _, f, h, w = z.shape
        z = z.to(self.dtype)
        mean, inv_std = _latent_stats(z.device, z.dtype)
        x = self.conv2(z / inv_std + mean).contiguous(memory_format=torch.channels_last_3d)   # [B, 48, f, h, w]
        packed = torch.empty((b, 3 * PATCH * PATCH, 1 + TIME_STRIDE * (f - 1), 8 * h, 8 * w),
                             dtype=self.dtype, device=z.device)   # [B, 12, F, 8h, 8w]
        state = ChunkState(dtype or self.decode_dtype or self.dtype)
        packed[:, :, :1] = self.decoder(x[:, :, :1], state)
        state.first = False
        step = self.decode_frames_per_chunk(h, w)
        for start in range(1, f, step):
            stop = min(start + step, f)
            frames = slice(1 + TIME_STRIDE * (start - 1), 1 + TIME_STRIDE * (stop - 1))
            packed[:, :, frames] = self.decoder(x[:, :, start:stop], state)
        return unpack_pixels(packed).clamp_(-1, 1)
