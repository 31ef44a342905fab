"""IceVQModel: the hierarchical VQ-VAE image tokenizer of icetk (CogView2's "HVQVAE"), as a diffusers model.

One encoder (÷4), a chain of residual down-samplers (÷2 each), one codebook and one decoder per compression
rate. Rate r uses level l = log2(r) - 2: the encoder output passes through the first l down-samplers, is
quantized, and decodes with `decs[levels - 1 - l]` (rate 4 -> decs.2, 8 -> decs.1, 16 -> decs.0, as icetk).
Module and parameter names follow icetk, so `ice_image.pt` converts key for key.

Ships with converted checkpoints (remote code): imports only torch and diffusers. `compute_cluster_labels`
imports scikit-learn inside the function; nothing else needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

# icetk's normalisation of RGB images in [0, 1] (torchvision Normalize)
ICETK_IMAGE_MEAN = (0.79093, 0.76271, 0.75340)
ICETK_IMAGE_STD = (0.30379, 0.32279, 0.32800)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class IceVQResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3, twice, plus a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class IceVQAttnBlock(nn.Module):
    """Single-head self-attention over the h*w grid with 1x1 q/k/v/proj convs and scale C^-1/2; residual."""

    def __init__(self, channels: int, num_groups: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(num_groups, channels, eps=eps)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head, positions in raster order
        q, k, v = (conv(h).flatten(2).transpose(1, 2).unsqueeze(1) for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale = C^-1/2, as icetk
        out = out.squeeze(1).transpose(1, 2).reshape(batch, channels, height, width)
        return x + self.proj_out(out)


class IceVQDownsample(nn.Module):
    """Stride-2 3x3 conv after one row/column of zero padding at the bottom/right (⌊n/2⌋ outputs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class IceVQUpsample(nn.Module):
    """Nearest-neighbour ×2 then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class IceVQLevel(nn.Module):
    """One resolution level: ResNet blocks (each optionally followed by attention) and an optional resampler."""

    def __init__(self, channels: Sequence[int], use_attention: bool, resample: nn.Module | None, groups: int,
                 eps: float):
        super().__init__()
        self.block = nn.ModuleList(
            IceVQResnetBlock(c_in, c_out, groups, eps) for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.attn = nn.ModuleList(IceVQAttnBlock(c, groups, eps) for c in channels[1:] if use_attention)
        if isinstance(resample, IceVQDownsample):
            self.downsample = resample
        elif isinstance(resample, IceVQUpsample):
            self.upsample = resample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class IceVQMid(nn.Module):
    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.block_1 = IceVQResnetBlock(channels, channels, groups, eps)
        self.attn_1 = IceVQAttnBlock(channels, groups, eps)
        self.block_2 = IceVQResnetBlock(channels, channels, groups, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class IceVQEncoder(nn.Module):
    """conv_in -> levels (÷2 after each but the last) -> mid (Res, Attn, Res) -> GroupNorm, swish, conv_out.

    `[B, in_channels, H, W] -> [B, z_channels, H / 2^(levels-1), W / 2^(levels-1)]`
    """

    def __init__(self, in_channels: int, channels: int, z_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, resolution: int, attn_resolutions: Sequence[int], groups: int, eps: float):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels] + [channels * m for m in channel_mult]
        self.down = nn.ModuleList()
        for i in range(len(channel_mult)):
            resample = IceVQDownsample(widths[i + 1]) if i < len(channel_mult) - 1 else None
            level_widths = [widths[i]] + [widths[i + 1]] * num_res_blocks
            use_attention = resolution // 2**i in attn_resolutions
            self.down.append(IceVQLevel(level_widths, use_attention, resample, groups, eps))
        self.mid = IceVQMid(widths[-1], groups, eps)
        self.norm_out = nn.GroupNorm(groups, widths[-1], eps=eps)
        self.conv_out = nn.Conv2d(widths[-1], z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class IceVQPatchEncoder(nn.Module):
    """A local encoder (not in icetk): every output position sees only its own `patch_size`² pixels.

    patch embedding (a convolution with kernel = stride = `patch_size`) -> `depth` residual 1x1 MLP blocks ->
    swish, 1x1 conv_out. icetk's encoder sees most of a small image from every position (3x3 convolutions and a
    global attention block), so one flat region gets different codes depending on what lies around it; a local
    encoder gives the same patch the same code everywhere, which makes token sequences far easier to model on small
    datasets (the embedded demo model uses it).

    `[B, in_channels, H, W] -> [B, z_channels, H / patch_size, W / patch_size]`
    """

    def __init__(self, in_channels: int, width: int, z_channels: int, patch_size: int, depth: int):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(nn.Conv2d(width, width, 1) for _ in range(depth))
        self.conv_out = nn.Conv2d(width, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x)
        for block in self.blocks:
            h = h + block(_swish(h))
        return self.conv_out(_swish(h))


class IceVQDecoder(nn.Module):
    """conv_in -> mid (Res, Attn, Res) -> levels from deepest to shallowest (×2 after each but level 0) -> out.

    `[B, z_channels, h, w] -> [B, out_channels, h * 2^(levels-1), w * 2^(levels-1)]`. `up[i]` is level i, run in
    reverse order, as in icetk.
    """

    def __init__(self, out_channels: int, channels: int, z_channels: int, channel_mult: Sequence[int],
                 num_res_blocks: int, resolution: int, attn_resolutions: Sequence[int], groups: int, eps: float):
        super().__init__()
        num_levels = len(channel_mult)
        width = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = IceVQMid(width, groups, eps)
        levels: list[IceVQLevel] = []
        res = resolution // 2 ** (num_levels - 1)
        for i in reversed(range(num_levels)):
            out_width = channels * channel_mult[i]
            resample = IceVQUpsample(out_width) if i > 0 else None
            levels.append(IceVQLevel([width] + [out_width] * num_res_blocks, res in attn_resolutions, resample,
                                     groups, eps))
            width = out_width
            if i > 0:
                res *= 2
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = nn.GroupNorm(groups, width, eps=eps)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_swish(self.norm_out(h)))


class IceVQResidualDownSample(nn.Module):
    """avg-pool 2x2 + stride-2 conv, summed (no norm, no activation): halves the latent grid."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv_down_sampler = IceVQDownsample(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, kernel_size=2, stride=2) + self.conv_down_sampler(x)


class IceVQQuantizer(nn.Module):
    """1x1 `proj` then the nearest codebook row (`embed.weight`) by squared L2 distance.

    icetk's EMA training buffers (`cluster_size`, `embed_avg`) are not kept: nothing at inference reads them.
    """

    def __init__(self, z_channels: int, embedding_dim: int, num_embeddings: int):
        super().__init__()
        self.proj = nn.Conv2d(z_channels, embedding_dim, 1)
        self.embed = nn.Embedding(num_embeddings, embedding_dim)

    def nearest(self, z_e: torch.Tensor, chunk_size: int = 4096) -> torch.LongTensor:
        """`z_e` `[B, D, h, w]` -> ids `[B, h, w]`, computed in fp32 as argmin |z|² - 2 z·e + |e|²."""
        batch, dim, height, width = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, dim).float()
        codebook = self.embed.weight.float()
        codebook_sq = codebook.pow(2).sum(1)
        ids = []
        # chunked: the full distance matrix of a 60x60 grid against 20000 codes would be ~290 MB per image
        for rows in flat.split(chunk_size):
            dist = rows.pow(2).sum(1, keepdim=True) - 2 * rows @ codebook.t() + codebook_sq
            ids.append(dist.argmin(1))
        return torch.cat(ids).view(batch, height, width)

    def lookup(self, ids: torch.LongTensor) -> torch.Tensor:
        """ids `[B, h, w]` -> codebook vectors `[B, D, h, w]`."""
        return self.embed(ids).permute(0, 3, 1, 2)


class IceVQModel(ModelMixin, ConfigMixin):
    r"""icetk's hierarchical VQ-VAE (CogView2's image tokenizer): images <-> grids of codebook ids.

    Defaults are the official `ice_image.pt` (97.4 M parameters, 20000 codes of dimension 256). Images are RGB in
    [0, 1]; the model normalises them with icetk's mean/std and de-normalises decoded images (without clamping).

    Args:
        in_channels, out_channels: image channels (3).
        channels: base width of the encoder and decoders (128); every width `channels * mult` must be a multiple
            of `norm_num_groups`.
        z_channels: encoder output / down-sampler width (256).
        embedding_dim: codebook vector size (256).
        num_embeddings: codebook size (20000); ids are `[0, num_embeddings)`.
        encoder_channel_mult: encoder widths per level (1, 2, 4); the encoder downsamples by
            `2 ** (len - 1)` (4).
        encoder_num_res_blocks: ResNet blocks per encoder level (2); with `encoder_type="patch"`, the number of
            residual 1x1 blocks.
        encoder_type: "icetk" (the official encoder) or "patch" (`IceVQPatchEncoder`: local, one patch per
            position, of width `channels * encoder_channel_mult[-1]`; not in icetk).
        decoder_channel_mults: one multiplier tuple per decoder, `decs.0` first; decoder `levels - 1 - l` serves
            level l, so it must upsample by the rate of that level.
        decoder_num_res_blocks: ResNet blocks per decoder level (1; icetk's argument `num_res_blocks=0` means 1).
        resolution, attn_resolutions: place attention blocks as icetk does (a level whose nominal resolution is
            in `attn_resolutions` gets one after each ResNet block; only `decs.0`'s deepest level by default).
        norm_num_groups, norm_eps: GroupNorm settings (32, 1e-6).
        compress_rate: default rate of `encode`/`decode` (8 in CogView2: 160 px <-> 20x20, 480 px <-> 60x60).
        image_mean, image_std: icetk's normalisation constants.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: int = 128,
        z_channels: int = 256,
        embedding_dim: int = 256,
        num_embeddings: int = 20000,
        encoder_channel_mult: Sequence[int] = (1, 2, 4),
        encoder_num_res_blocks: int = 2,
        decoder_channel_mults: Sequence[Sequence[int]] = ((1, 1, 1, 2, 4), (1, 1, 2, 4), (1, 2, 4)),
        decoder_num_res_blocks: int = 1,
        resolution: int = 256,
        attn_resolutions: Sequence[int] = (16,),
        norm_num_groups: int = 32,
        norm_eps: float = 1e-6,
        compress_rate: int = 8,
        image_mean: Sequence[float] = ICETK_IMAGE_MEAN,
        image_std: Sequence[float] = ICETK_IMAGE_STD,
        encoder_type: str = "icetk",
    ):
        super().__init__()
        levels = len(decoder_channel_mults)
        encoder_factor = 2 ** (len(encoder_channel_mult) - 1)
        for level, mult in enumerate(reversed(decoder_channel_mults)):
            if 2 ** (len(mult) - 1) != encoder_factor * 2**level:
                raise ValueError(f"decoder_channel_mults[{levels - 1 - level}] = {tuple(mult)} upsamples by "
                                 f"{2 ** (len(mult) - 1)} but serves rate {encoder_factor * 2**level}")
        widths = [channels * m for m in encoder_channel_mult] + [channels * m for d in decoder_channel_mults for m in d]
        if any(w % norm_num_groups for w in widths + [channels]):
            raise ValueError(f"every width channels * mult must be a multiple of norm_num_groups={norm_num_groups}")
        if len(image_mean) != in_channels or len(image_std) != in_channels:
            raise ValueError(f"image_mean/image_std need {in_channels} values")
        if compress_rate not in self.compress_rates:
            raise ValueError(f"compress_rate must be one of {self.compress_rates}, got {compress_rate}")

        if encoder_type not in ("icetk", "patch"):
            raise ValueError(f"encoder_type must be 'icetk' or 'patch', got {encoder_type!r}")

        attn_resolutions = tuple(attn_resolutions)
        if encoder_type == "patch":
            self.enc = IceVQPatchEncoder(in_channels, channels * encoder_channel_mult[-1], z_channels, encoder_factor,
                                         encoder_num_res_blocks)
        else:
            self.enc = IceVQEncoder(in_channels, channels, z_channels, encoder_channel_mult, encoder_num_res_blocks,
                                    resolution, attn_resolutions, norm_num_groups, norm_eps)
        # registration order = icetk's state-dict order
        self.decs = nn.ModuleList(
            IceVQDecoder(out_channels, channels, embedding_dim, mult, decoder_num_res_blocks, resolution,
                         attn_resolutions, norm_num_groups, norm_eps)
            for mult in decoder_channel_mults
        )
        self.quantize = IceVQQuantizer(z_channels, embedding_dim, num_embeddings)
        self.down_samplers = nn.ModuleList(IceVQResidualDownSample(z_channels) for _ in range(levels - 1))

    @property
    def compress_rates(self) -> tuple[int, ...]:
        """Supported compression rates, one per level (4, 8, 16)."""
        encoder_factor = 2 ** (len(self.config.encoder_channel_mult) - 1)
        return tuple(encoder_factor * 2**level for level in range(len(self.config.decoder_channel_mults)))

    def _level(self, compress_rate: int | None) -> int:
        rate = self.config.compress_rate if compress_rate is None else compress_rate
        if rate not in self.compress_rates:
            raise ValueError(f"compress_rate must be one of {self.compress_rates}, got {rate}")
        return self.compress_rates.index(rate)

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 tensors built from the config, not buffers: `model.to(torch.bfloat16)` must not round them
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.config.image_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.image_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> icetk's normalised input, in fp32: `(x - mean) / std`."""
        mean, std = self._constants(images.device)
        return (images.float() - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder output -> RGB (about [0, 1], not clamped): `x * std + mean`, in fp32."""
        mean, std = self._constants(x.device)
        return x.float() * std + mean

    def _check_images(self, images: torch.Tensor, rate: int) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}; "
                            "use IceVQImageProcessor.preprocess for PIL images or numpy arrays")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"images must be [B, {self.config.in_channels}, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 images by "
                            "255 (IceVQImageProcessor.preprocess does)")
        batch, _, height, width = images.shape
        if batch == 0 or height % rate or width % rate or height == 0 or width == 0:
            suggestion = max(rate, min(height, width) // rate * rate)
            raise ValueError(f"image size {height}x{width} (batch {batch}) is not a non-empty multiple of the "
                             f"compression rate {rate}; resize or crop it (e.g. IceVQImageProcessor(image_size="
                             f"{suggestion}).preprocess(images))")
        low, high = float(images.amin()), float(images.amax())
        if math.isnan(low) or math.isnan(high):
            raise ValueError("images contain NaN pixels; fix or drop those images before encoding them")
        if low < -1e-4 or high > 1 + 1e-4:
            raise ValueError(f"images must be RGB in [0, 1] (icetk normalises them itself), got values in [{low:.3g}, "
                             f"{high:.3g}]; map [-1, 1] images with (x + 1) / 2 and clamp decoded images first")
        return images

    def encode_latents(self, images: torch.Tensor, compress_rate: int | None = None) -> torch.Tensor:
        """`[B, 3, H, W]` in [0, 1] -> quantizer input ("latent") `[B, z_channels, H / r, W / r]`."""
        level = self._level(compress_rate)
        images = self._check_images(images, self.compress_rates[level])
        h = self.enc(self.normalize(images).to(self.dtype))
        for down_sampler in self.down_samplers[:level]:
            h = down_sampler(h)
        return h

    @apply_forward_hook
    def encode(self, images: torch.Tensor, compress_rate: int | None = None) -> torch.LongTensor:
        """Tokenize images: `[B, 3, H, W]` RGB in [0, 1] (H, W multiples of the rate) -> ids `[B, H / r, W / r]`.

        A single image `[3, H, W]` gives `[1, h, w]`. icetk returns the same ids flattened to `[B, h * w]`.
        """
        return self.quantize.nearest(self.quantize.proj(self.encode_latents(images, compress_rate)))

    def decode_raw(self, ids: torch.Tensor, compress_rate: int | None = None) -> torch.Tensor:
        """ids `[B, h, w]` -> decoder output before de-normalisation `[B, 3, h * r, w * r]`."""
        level = self._level(compress_rate)
        if not isinstance(ids, torch.Tensor):
            ids = torch.as_tensor(ids)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() != 3:
            raise ValueError(f"ids must be [B, h, w], got shape {tuple(ids.shape)}; reshape flat ids with "
                             "ids.view(B, h, w) (a [B, N] grid shape is ambiguous)")
        if ids.numel() == 0:
            raise ValueError(f"ids must not be empty, got shape {tuple(ids.shape)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.config.num_embeddings:
            raise ValueError(f"ids must be in [0, {self.config.num_embeddings}) (image tokens only), got values in "
                             f"[{low}, {high}]; subtract any text offset and drop special tokens first")
        quant = self.quantize.lookup(ids.to(self.device, torch.long))
        return self.decs[len(self.decs) - 1 - level](quant)

    @apply_forward_hook
    def decode(self, ids: torch.Tensor, compress_rate: int | None = None) -> torch.Tensor:
        """Detokenize: ids `[B, h, w]` -> RGB images `[B, 3, h * r, w * r]` (about [0, 1], not clamped, like icetk).

        Every image of the batch is decoded independently (icetk's `[B, N]` input is rejected: its batched decode
        is wrong). Clamp or use `IceVQImageProcessor.postprocess` for PIL/numpy output.
        """
        return self.denormalize(self.decode_raw(ids, compress_rate))

    @torch.no_grad()
    def compute_cluster_labels(self, num_clusters: int, seed: int = 0, max_iter: int = 300) -> torch.LongTensor:
        """Cluster the codebook vectors with k-means (scikit-learn) for CogView2's cluster sampling.

        The official `cluster_label.npy` (500 clusters of the 20000 codes) was made by an unpublished procedure;
        this gives a table of the same form for a new codebook.

        Args:
            num_clusters: number of clusters; every cluster id in `[0, num_clusters)` is used.
            seed: k-means initialisation seed; the same seed gives the same labels.
            max_iter: k-means iterations.

        Returns:
            `LongTensor [num_embeddings]`: cluster id of every code.
        """
        from sklearn.cluster import KMeans  # optional dependency, only for this computation

        vectors = self.quantize.embed.weight.detach().double().cpu()
        num_codes = vectors.shape[0]
        if not isinstance(num_clusters, int) or not 1 <= num_clusters <= num_codes:
            raise ValueError(f"num_clusters must be an int in [1, {num_codes}], got {num_clusters!r}")
        distinct = torch.unique(vectors, dim=0).shape[0]
        if distinct < num_clusters:
            raise ValueError(f"the codebook has only {distinct} distinct vectors, fewer than num_clusters="
                             f"{num_clusters}; ask for at most {distinct} clusters")
        kmeans = KMeans(n_clusters=num_clusters, init="k-means++", n_init=1, max_iter=max_iter, random_state=seed)
        labels = torch.from_numpy(kmeans.fit_predict(vectors.numpy())).long()
        # k-means can leave a cluster empty (ties, duplicates); give it the code farthest from its centre
        centres = torch.from_numpy(kmeans.cluster_centers_)
        for cluster in range(num_clusters):
            if (labels == cluster).any():
                continue
            sizes = torch.bincount(labels, minlength=num_clusters)
            movable = sizes[labels] > 1
            distance = (vectors - centres[labels]).pow(2).sum(1).masked_fill(~movable, -math.inf)
            labels[distance.argmax()] = cluster
        return labels


__all__ = ["ICETK_IMAGE_MEAN", "ICETK_IMAGE_STD", "IceVQModel"]
