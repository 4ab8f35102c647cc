"""Every nn.Module of the project and the math it needs (the rasterizer is in render.py, readers of
released checkpoints in weights.py).

Camera rays and ray encodings; GS-LRM as released with FaceLift; FaceLift's multi-view UNet, its
conditioning and sampler; the dance modules (music-to-pose encoder, ArcFace's IResNet, pose guider,
StableAnimator's face encoder, ReferenceNet attention, DanceNet) and their sampler.
Conventions are 3DGS/gsplat's: OpenCV cameras (x right, y down, z forward),
`w2c` world-to-camera matrices, intrinsics as 3x3 `K`, quaternions (w, x, y, z), RGB colours.
"""
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    MotionAdapter,
    UNet2DConditionModel,
    UNetMotionModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.controlnets.controlnet import ControlNetConditioningEmbedding
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange, repeat
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionModelWithProjection

from plumbing import InputError
from render import DeferredRender, _render_views

# ----------------------------------------------------------------------------------------------
# Cameras and rays


def look_at_c2w(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)):
    """OpenCV camera-to-world matrix (4, 4) of a camera at `eye` looking at `target`, with world
    `up` pointing up in the image (camera y = down)."""
    eye, target, up = (torch.as_tensor(v, dtype=torch.float64) for v in (eye, target, up))
    z = F.normalize(target - eye, dim=0)  # forward
    x = F.normalize(torch.linalg.cross(z, up), dim=0)  # right = forward x up
    y = torch.linalg.cross(z, x)  # down, so that x, y, z is right-handed
    c2w = torch.eye(4, dtype=torch.float64)
    c2w[:3, :3] = torch.stack([x, y, z], dim=1)
    c2w[:3, 3] = eye
    return c2w


def intrinsics_matrix(fxfycxcy):
    """(..., 4) fx, fy, cx, cy -> (..., 3, 3) K."""
    fx, fy, cx, cy = fxfycxcy.unbind(-1)
    K = torch.zeros(fxfycxcy.shape[:-1] + (3, 3), dtype=fxfycxcy.dtype, device=fxfycxcy.device)
    K[..., 0, 0], K[..., 1, 1], K[..., 0, 2], K[..., 1, 2], K[..., 2, 2] = fx, fy, cx, cy, 1.0
    return K


def get_rays(c2w, fxfycxcy, H, W):
    """Rays through pixel centres (x + 0.5, y + 0.5).
    c2w (..., 4, 4), fxfycxcy (..., 4) -> origins, unit world directions, each (..., H, W, 3)."""
    dev, dt = c2w.device, c2w.dtype
    ys, xs = torch.meshgrid(torch.arange(H, device=dev, dtype=dt) + 0.5,
                            torch.arange(W, device=dev, dtype=dt) + 0.5, indexing="ij")  # (H, W)
    fx, fy, cx, cy = (t[..., None, None] for t in fxfycxcy.unbind(-1))  # (..., 1, 1)
    x_cam = (xs - cx) / fx  # (..., H, W)
    d_cam = torch.stack([x_cam, (ys - cy) / fy, torch.ones_like(xs).expand_as(x_cam)], -1)  # (..., H, W, 3)
    dirs = F.normalize(torch.einsum("...ij,...hwj->...hwi", c2w[..., :3, :3], d_cam), dim=-1)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)  # (..., H, W, 3)
    return origins, dirs


def ray_encoding_facelift(origins, dirs):
    """FaceLift's per-pixel ray channels (..., 6): the direction d, then the point on the ray
    closest to the world origin, o + (-o.d) d (a ray is then independent of where its origin sits)."""
    t = -(origins * dirs).sum(-1, keepdim=True)  # (..., 1)
    return torch.cat([dirs, origins + t * dirs], dim=-1)


# ----------------------------------------------------------------------------------------------
# GS-LRM, exactly as released with FaceLift: posed views -> one pixel-aligned Gaussian per pixel
# (+ 2 free Gaussians from 2 learned tokens). A plain pre-LN transformer over all views' patches.

GSLRM_CONFIGS = {
    "tiny": dict(d=32, layers=2, heads=2, patch=8),  # tests
    "toy": dict(d=192, layers=6, heads=3, patch=4),  # the CPU toy run (32 px views)
    "facelift": dict(d=1024, layers=24, heads=16, patch=8),  # FaceLift's released model (512 px views)
}


SH_C0 = 0.28209479177387814  # degree-0 spherical harmonic: rgb = 0.5 + SH_C0 * sh_dc


def attention(q, k, v):
    """q (..., Lq, d), k, v (..., Lk, d) -> (..., Lq, d): SDPA, except under CPU autocast, where SDPA's bf16
    backward is slower than bf16 matmuls (`bench.py --only=attention`): scores by matmul, softmax in fp32."""
    if q.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return F.scaled_dot_product_attention(q, k, v)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (..., Lq, Lk)
    return scores.float().softmax(-1) @ v


class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(d, 3 * d, bias=False)
        self.fc = nn.Linear(d, d, bias=False)

    def forward(self, x):
        qkv = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (rearrange(t, "b l (h e) -> b h l e", h=self.heads) for t in qkv)  # (B, heads, L, d_head)
        x = attention(q, k, v)  # (B, heads, L, d_head)
        return self.fc(rearrange(x, "b h l e -> b l (h e)"))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.attn = SelfAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GSLRM(nn.Module):
    def __init__(self, d, layers, heads, patch, grad_checkpoint=False, deferred_render=False):
        super().__init__()
        self.patch, self.grad_checkpoint, self.deferred_render = patch, grad_checkpoint, deferred_render
        self.patch_embed = nn.Linear(9 * patch * patch, d, bias=False)
        self.extra_tokens = nn.Parameter(torch.zeros(2, d))
        self.input_norm = nn.LayerNorm(d, bias=False)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.extra_head = nn.Sequential(nn.LayerNorm(d, bias=False), nn.Linear(d, 14, bias=False))
        self.pixel_head = nn.Sequential(nn.LayerNorm(d, bias=False),
                                        nn.Linear(d, patch * patch * 14, bias=False))
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.trunc_normal_(self.extra_tokens, std=0.02)

    def forward(self, images, c2w, fxfycxcy):
        """images (B, V, 3, H, W) in [0, 1], c2w (B, V, 4, 4), fxfycxcy (B, V, 4) ->
        Gaussians {means, scales, quats, opacities, rgb}, each (B, 2 + V*H*W, ...)."""
        B, V, _, H, W = images.shape
        p = self.patch
        with torch.autocast(c2w.device.type, enabled=False):  # rays, and so positions, in fp32
            o, d = get_rays(c2w.float(), fxfycxcy.float(), H, W)  # (B, V, H, W, 3) each
        rays = rearrange(ray_encoding_facelift(o, d), "b v h w c -> b v c h w")  # (B, V, 6, H, W)
        x = torch.cat([images * 2 - 1, rays.to(images.dtype)], dim=2)  # (B, V, 9, H, W)
        x = rearrange(x, "b v c (h ph) (w pw) -> b (v h w) (ph pw c)", ph=p, pw=p)  # (B, V*h*w, 9*p*p)
        x = torch.cat([self.extra_tokens.expand(B, -1, -1), self.patch_embed(x)], dim=1)  # (B, 2 + V*h*w, d)
        x = self.input_norm(x)
        ckpt = self.grad_checkpoint and self.training
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        extra = self.extra_head(x[:, :2])  # (B, 2, 14)
        pix = rearrange(self.pixel_head(x[:, 2:]), "b (v h w) (ph pw c) -> b v (h ph) (w pw) c",
                        v=V, h=H // p, ph=p, pw=p)  # (B, V, H, W, 14)
        # Pixel-aligned: each Gaussian sits on its pixel's ray, within +-1.8 of the ray's point
        # closest to the origin (so the depth range does not depend on the camera distance).
        t_mid = -(o * d).sum(-1, keepdim=True)  # (B, V, H, W, 1)
        depth = (2 * torch.sigmoid(pix[..., :3].float().mean(-1, keepdim=True)) - 1) * 1.8 + t_mid
        xyz = o + depth * d  # (B, V, H, W, 3), fp32
        # positions stay fp32 under bf16 autocast (bf16 would move them by up to ~2 px at 512 px)
        pix = torch.cat([xyz, pix[..., 3:].float()], -1).flatten(1, 3)  # (B, V*H*W, 14)
        # Order: the 2 extra Gaussians, then one per pixel by view, image row, image column. FaceLift's
        # list goes by view, patch row, patch column, row in patch, column in patch (same set, other order).
        raw = torch.cat([extra.float(), pix], dim=1)  # (B, 2 + V*H*W, 14)
        xyz, sh, scale, rot, opac = raw.split([3, 3, 3, 4, 1], dim=-1)
        return {"means": xyz, "rgb": 0.5 + SH_C0 * sh, "scales": torch.exp((scale - 2.3).clamp(max=-1.2)),
                "quats": F.normalize(rot, dim=-1), "opacities": torch.sigmoid(opac[..., 0] - 2.0)}

    def render(self, gaussians, c2w, fxfycxcy, H, W, bg=1.0):
        """Gaussians (B, N, ...) -> images (B, V, 4, H, W) seen by cameras c2w (B, V, 4, 4):
        RGB composited on `bg`, then the accumulated opacity (alpha)."""
        g = gaussians
        args = (g["means"], g["quats"], g["scales"], g["opacities"], g["rgb"].clamp(min=0),
                torch.linalg.inv(c2w.float()), intrinsics_matrix(fxfycxcy.float()))
        render = DeferredRender.apply if self.deferred_render and torch.is_grad_enabled() else _render_views
        return render(H, W, bg, *args)


# ----------------------------------------------------------------------------------------------
# Perceptual networks: VGG feature extractors for the perceptual loss and LPIPS
# (GS-LRM losses)
# torchvision's `vgg16().features` / `vgg19().features` layouts, so that their state dicts load
# unchanged (keys `features.{i}.weight`); only the layers up to the deepest tap are built.
# MatConvNet's `imagenet-vgg-verydeep-19.mat` (FaceLift's loss) lists its layers in the same order,
# so its conv `layers[i]` is our `features[i]`.
VGG_LAYERS = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512],
}


# indices into `features` of the ReLUs whose outputs are compared
VGG_TAPS = {
    "vgg19": (3, 8, 13, 22, 31),  # relu1_2, relu2_2, relu3_2, relu4_2, relu5_2 (FaceLift's perceptual loss)
    "vgg16": (3, 8, 15, 22, 29),  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (LPIPS)
}


class VGGFeatures(nn.Module):
    """A frozen VGG trunk that returns the activations at `VGG_TAPS[arch]`. `pool`: "max"
    (torchvision) or "avg" (FaceLift's VGG19); `preprocess` names the input normalisation that its
    weights expect (the loader sets it; perceptual_loss reads it)."""

    def __init__(self, arch, pool="max"):
        super().__init__()
        self.taps, self.preprocess = VGG_TAPS[arch], "torchvision"
        layers, c_in = [], 3
        for v in VGG_LAYERS[arch]:
            if v == "M":
                layers.append({"max": nn.MaxPool2d, "avg": nn.AvgPool2d}[pool](2, 2))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
            if len(layers) > self.taps[-1]:
                break
        self.features = nn.Sequential(*layers[: self.taps[-1] + 1])
        self.requires_grad_(False).eval()

    def forward(self, x):
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                feats.append(x)
        return feats


# ----------------------------------------------------------------------------------------------
# Multi-view diffusion: FaceLift's UNet with multi-view attention, the sampler
# (train_mvdiff.py, gen_synthetic.py)
#
# FaceLift's multi-view diffusion model is Stable Diffusion 2.1-unclip's UNet (diffusers key names)
# whose self-attention (`attn1`) lets the views of one object look at each other. The views of an
# object sit consecutively in the batch: (B objects * V views, ...). We keep diffusers'
# UNet2DConditionModel as is and only swap the attention processors, so FaceLift's weights load
# into it unchanged and our checkpoints stay plain diffusers `unet/` folders.

MVDIFF_UNET_CONFIGS = {
    # tests: a few seconds per step on a CPU
    "tiny": dict(sample_size=16, in_channels=6, out_channels=3, layers_per_block=1,
                 block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8),
    # the toy: pixel-space diffusion at 32 px (3 noisy + 3 reference channels); attention only at 8x8
    # (multi-view and cross), as attention at 16x16 costs more CPU time than the rest of the UNet
    "toy": dict(sample_size=32, in_channels=6, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                cross_attention_dim=32, attention_head_dim=16, norm_num_groups=16),
    # FaceLift = SD 2.1-unclip: 4 latent + 4 reference-latent channels, CLIP-H image embedding +
    # noise-level embedding (2 x 1024) through a projection class embedding, OpenCLIP-H text width 1024
    "facelift": dict(sample_size=32, in_channels=8, out_channels=4, layers_per_block=2,
                     block_out_channels=(320, 640, 1280, 1280),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                     class_embed_type="projection", projection_class_embeddings_input_dim=2048),
}


def check_plain_attention(attn, attention_mask):  # options the SD UNet never sets: refuse, not ignore
    assert attention_mask is None and attn.group_norm is None and attn.spatial_norm is None and not attn.norm_q
    assert not attn.norm_k and not attn.residual_connection and attn.rescale_output_factor == 1.0


class MVAttnProcessor:
    """Self-attention across the V views of each object (hidden states (B*V, N, C), views consecutive).
    sparse: each view's queries attend to [reference view's keys/values; its own] concatenated along
    the tokens, the reference view included (it sees its own tokens twice): FaceLift's pattern, which
    its weights were trained with. dense: every view attends to all V*N tokens of its object."""

    def __init__(self, num_views, sparse=True):
        self.num_views, self.sparse = num_views, sparse

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ref_idx=None):
        assert encoder_hidden_states is None, "multi-view attention is self-attention only"
        check_plain_attention(attn, attention_mask)
        V = self.num_views
        B = hidden_states.shape[0] // V
        if ref_idx is None:
            ref_idx = torch.zeros(B, dtype=torch.long, device=hidden_states.device)  # FaceLift: always view 0
        q, k, v = (rearrange(f(hidden_states), "(b v) n (h d) -> b v h n d", v=V, h=attn.heads)
                   for f in (attn.to_q, attn.to_k, attn.to_v))  # (B, V, heads, N, d) each
        if self.sparse:
            b = torch.arange(B, device=q.device)
            # keys and values: [reference view's; own] along the tokens
            k = torch.cat([k[b, ref_idx][:, None].expand_as(k), k], dim=3)  # (B, V, heads, 2N, d)
            v = torch.cat([v[b, ref_idx][:, None].expand_as(v), v], dim=3)
            # 4-D inputs: with 5-D ones SDPA falls back to its slow math path
            q, k, v = (rearrange(t, "b v h n d -> (b v) h n d") for t in (q, k, v))
            out = attention(q, k, v)  # (B*V, heads, N, d)
            out = rearrange(out, "bv h n d -> bv n (h d)")
        else:
            q, k, v = (rearrange(t, "b v h n d -> b h (v n) d") for t in (q, k, v))  # (B, heads, V*N, d)
            out = attention(q, k, v)
            out = rearrange(out, "b h (v n) d -> (b v) n (h d)", v=V)
        return attn.to_out[1](attn.to_out[0](out))  # linear, dropout


class CrossAttnProcessor:
    """attn2 (to the prompt embeddings): diffusers' AttnProcessor2_0 with `attention` (its bf16 SDPA was the
    CPU toy's slowest op), ignoring the reference index the UNet passes to every processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ref_idx=None):
        assert hidden_states.dim() == 3 and attn.norm_cross is None
        check_plain_attention(attn, attention_mask)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states  # (B, T, D)
        q = rearrange(attn.to_q(hidden_states), "b n (h d) -> b h n d", h=attn.heads)  # (B, heads, N, d)
        k, v = (rearrange(f(ctx), "b t (h d) -> b h t d", h=attn.heads) for f in (attn.to_k, attn.to_v))
        out = rearrange(attention(q, k, v), "b h n d -> b n (h d)")  # (B, N, heads * d)
        return attn.to_out[1](attn.to_out[0](out))  # linear, dropout


def install_mv_attention(unet, num_views, sparse=True):
    """Every attn1 -> MVAttnProcessor, every attn2 -> CrossAttnProcessor. Returns the attn1 count."""
    mv = MVAttnProcessor(num_views, sparse)
    procs = {name: mv if ".attn1." in name else CrossAttnProcessor() for name in unet.attn_processors}
    n_mv = sum(p is mv for p in procs.values())
    unet.set_attn_processor(procs)  # (empties the dict)
    return n_mv


class MVUNet(nn.Module):
    """A diffusers UNet2DConditionModel run on the V views of B objects at once, with multi-view
    attention and a per-rig-view embedding of the reference view added to the time embedding.
    That embedding starts at zero, so loaded FaceLift weights behave exactly as released (where the
    reference is always view 0) until training teaches the model to read it."""

    def __init__(self, unet, num_views=6, sparse=True):
        super().__init__()
        self.unet, self.num_views, self.sparse = unet, num_views, sparse
        self.n_mv_layers = install_mv_attention(unet, num_views, sparse)
        self.ref_view_embed = nn.Embedding(num_views, unet.time_embedding.linear_2.out_features)
        nn.init.zeros_(self.ref_view_embed.weight)
        # diffusers' forward has no argument for an extra time-embedding term: add it at the output of
        # `time_embedding` (SD has no time_embed_act after it, so this is the embedding every resnet gets)
        self._ref_emb = None
        # a bound method: deepcopy rebinds it to the copy
        self.unet.time_embedding.register_forward_hook(self._add_ref_emb)

    def _add_ref_emb(self, module, inputs, out):
        return out if self._ref_emb is None else out + self._ref_emb

    def forward(self, noisy, t, prompt_embeds, ref_idx, ref_cond, class_labels=None):
        """noisy (B, V, C, H, W); t (B,) one timestep per object; prompt_embeds (V, T, D) or (B, V, T, D);
        ref_idx (B,) long; ref_cond (B, Cr, H, W) concatenated to every view's input (FaceLift: the
        reference's VAE latent; the toy: its pixels); class_labels (B, E) or None -> (B, V, C_out, H, W)."""
        B, V = noisy.shape[:2]
        assert V == self.num_views, f"{V} views, the model was built for {self.num_views}"
        x = torch.cat([noisy, ref_cond[:, None].expand(-1, V, -1, -1, -1)], dim=2)  # (B, V, C + Cr, H, W)
        one_set = prompt_embeds.dim() == 3  # (V, T, D): the same for every object
        ctx = prompt_embeds.expand(B, -1, -1, -1) if one_set else prompt_embeds  # (B, V, T, D)

        def rep(a):  # per object -> per view
            return None if a is None else repeat(a, "b ... -> (b v) ...", v=V)

        self._ref_emb = rep(self.ref_view_embed(ref_idx))  # (B*V, D_t)
        try:
            out = self.unet(rearrange(x, "b v c h w -> (b v) c h w"), rep(t),
                            rearrange(ctx, "b v t d -> (b v) t d"), class_labels=rep(class_labels),
                            cross_attention_kwargs={"ref_idx": ref_idx}).sample  # (B*V, C_out, H, W)
        finally:
            self._ref_emb = None
        return rearrange(out, "(b v) c h w -> b v c h w", v=V)


def build_mv_unet(preset, num_views=6, sparse=True, **overrides):
    return MVUNet(UNet2DConditionModel(**{**MVDIFF_UNET_CONFIGS[preset], **overrides}), num_views, sparse)


class Conditioner:
    """The reference conditions. Pixel space (toy): the reference image itself, no class labels.
    Latent space (FaceLift): VAE latents x 0.18215 (the targets sampled from the posterior, the
    reference its mode, as FaceLift), and the CLIP image embedding of the reference + the embedding
    of noise level 0 as class labels (SD 2.1-unclip; the unCLIP noising at level 0 is left out)."""

    def __init__(self, pipeline_dir, device):
        self.latent = bool(pipeline_dir)
        if self.latent:
            root = Path(pipeline_dir)
            self.vae = AutoencoderKL.from_pretrained(root / "vae", local_files_only=True).to(device).eval()
            self.clip = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder",
                                                                      local_files_only=True).to(device).eval()
            self.vae.requires_grad_(False)
            self.clip.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images, ref_idx, gen=None):
        """images (B, V, 3, H, W) in [-1, 1] -> x0 (B, V, C, h, w), ref (B, C, h, w), labels (B, E) | None.
        `gen` draws the targets' posterior samples (a step-seeded generator: resumable)."""
        ref_cond, labels = self.reference(images[torch.arange(len(images)), ref_idx])
        if not self.latent:
            return images, ref_cond, None
        x0 = self.vae.encode(images.flatten(0, 1)).latent_dist.sample(gen) * 0.18215  # (B*V, 4, h, w)
        return x0.unflatten(0, images.shape[:2]), ref_cond, labels  # x0 (B, V, 4, h, w)

    @torch.no_grad()
    def reference(self, ref):
        """Reference images (B, 3, H, W) in [-1, 1] -> the condition (B, C, h, w), labels (B, E) | None."""
        if not self.latent:
            return ref, None
        ref_latent = self.vae.encode(ref).latent_dist.mode() * 0.18215  # (B, 4, h, w)
        emb = clip_image_embeds(self.clip, (ref + 1) / 2)  # (B, 1024)
        level = get_timestep_embedding(torch.zeros(len(emb), device=emb.device), emb.shape[-1],
                                       flip_sin_to_cos=True, downscale_freq_shift=0)  # (B, 1024)
        return ref_latent, torch.cat([emb, level.to(emb)], -1)  # labels (B, 2048)

    @torch.no_grad()
    def decode(self, x):
        """(B, V, C, h, w) model space -> images (B, V, 3, H, W) in [0, 1]."""
        if self.latent:
            x = self.vae.decode(x.flatten(0, 1) / 0.18215).sample.unflatten(0, x.shape[:2])
        return ((x + 1) / 2).clamp(0, 1)


def mv_schedulers(prediction_type, beta_schedule, beta_start, beta_end, clip_sample, pipeline_dir=""):
    """DDPM (training's noising) and DDIM with the same betas (sampling); FaceLift's pipeline samples
    with its own scheduler/, which must agree with what the run trains."""
    noise = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=beta_start,
                          beta_end=beta_end, prediction_type=prediction_type, clip_sample=clip_sample)
    # trailing spacing: a few sampling steps still start at t = 999
    sampler = DDIMScheduler.from_config(noise.config, timestep_spacing="trailing")
    if pipeline_dir and (Path(pipeline_dir) / "scheduler").is_dir():
        sampler = DDIMScheduler.from_pretrained(pipeline_dir, subfolder="scheduler")
        for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end"):
            if sampler.config[key] != noise.config[key]:
                raise InputError(f"{pipeline_dir}/scheduler: {key} {sampler.config[key]!r}, "
                                 f"this run trains with {noise.config[key]!r}")
    return noise, sampler


@torch.no_grad()
def sample_views(model, scheduler, ref_cond, ref_idx, prompt_embeds, shape, class_labels=None,
                 num_steps=50, guidance=3.0, eta=1.0, generator=None):
    """DDIM with classifier-free guidance: all V views of B objects from their reference conditions.
    ref_cond (B, Cr, H, W), ref_idx (B,), prompt_embeds (V, T, D), shape = (C, H, W) of one view,
    class_labels (B, E) or None; generator: one, or a list of B (one per object). The unconditional
    branch zeroes the reference conditions (what training's dropout does) and keeps the prompt
    embeddings (they say which view is which). Returns the denoised views (B, V, C, H, W) in the
    model's space (latents, or pixels in [-1, 1])."""
    B, V = ref_cond.shape[0], model.num_views
    # a list of B generators draws each object's noise from its own: results do not depend on the batch
    x = randn_tensor((B, V, *shape), generator=generator, device=ref_cond.device, dtype=ref_cond.dtype)
    x = x * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_steps, device=ref_cond.device)
    cfg = guidance != 1.0
    if cfg:  # one batch of 2B objects: conditional, then unconditional
        ref_cond2 = torch.cat([ref_cond, torch.zeros_like(ref_cond)])
        labels2 = None if class_labels is None else torch.cat([class_labels, torch.zeros_like(class_labels)])
        ref_idx2 = torch.cat([ref_idx, ref_idx])
    for t in scheduler.timesteps:
        tt = t.to(ref_cond.device).expand(B * (2 if cfg else 1))
        if cfg:
            out_c, out_u = model(torch.cat([x, x]), tt, prompt_embeds, ref_idx2, ref_cond2, labels2).chunk(2)
            out = out_u + guidance * (out_c - out_u)
        else:
            out = model(x, tt, prompt_embeds, ref_idx, ref_cond, class_labels)
        x = scheduler.step(out, t, x, eta=eta, generator=generator).prev_sample
    return x


# ----------------------------------------------------------------------------------------------
# Dance: music-to-pose encoder, face recognizer (IResNet)
# (train_dance.py)

M2P_CONFIGS = {
    "tiny": dict(d=32, layers=1, heads=2, heatmap=8, hypotheses=2),  # tests
    "toy": dict(d=128, layers=3, heads=4, heatmap=12, hypotheses=4),  # the CPU toy run (64 px frames)
    "base": dict(d=512, layers=8, heads=8, heatmap=64, hypotheses=4),  # real data
}


class M2PEncoder(nn.Module):
    """Music window [B, T, D] + reference pose [B, J, 3] + reference face crop [B, 3, h, w] ->
    K hypotheses of per-frame per-joint heatmap logits [B, K, T, J, 2, H] (x logits over columns, then
    y logits over rows: the heatmap is separable, logits_2d[i, j] = y[i] + x[j]), the choice logits of
    each body part's hypothesis [B, P, K] and a 512-d L2-normalised face embedding.

    One song fits many dances (a limb moves on the beats, off them or not at all), and one regressed dance
    averages them into one that hardly moves: M2P is a mixture, per body part (`parts` = data.body_parts)
    as Bailando splits the body, of K hypotheses trained winner-takes-all (losses.m2p_loss); sampling
    draws one per part from the choice logits (losses.draw_hypothesis, assemble_dance).

    A depthwise temporal convolution (~1 s: turns beat impulses into smooth phase signals) and a
    pre-LN transformer over time (bidirectional: the whole window of music is known) on tokens
    music_proj(music) + pos[t] + pose_proj(ref pose) + face_proj(face features). The heatmap of a
    joint is a Gaussian (of learned per-joint width) around the reference joint moved by a
    predicted offset, plus a zero-initialised residual: training starts from the reference pose
    instead of from noise."""

    def __init__(self, music_dim, joints, d, layers, heads, heatmap, hypotheses=1, parts=None, max_frames=300,
                 face_size=32, embed_dim=512, conv_kernel=31, grad_checkpoint=False):
        super().__init__()
        self.J, self.H, self.K = joints, heatmap, hypotheses
        self.face_size, self.grad_checkpoint = face_size, grad_checkpoint
        # music features come in wildly different scales (MFCC ~100s, one-hots 0/1): normalised with
        # training-set statistics that the training script sets once and the checkpoint keeps
        self.register_buffer("music_mean", torch.zeros(music_dim))
        self.register_buffer("music_std", torch.ones(music_dim))
        self.music_proj = nn.Linear(music_dim, d)
        self.music_conv = nn.Conv1d(d, d, conv_kernel, padding=conv_kernel // 2, groups=d)
        self.pos = nn.Parameter(torch.zeros(max_frames, d))  # learned positions for up to max_frames
        self.pose_proj = nn.Linear(joints * 3, d)
        self.face_cnn = nn.Sequential(  # 32 -> 16 -> 8 -> 4 -> pooled
            nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
            nn.Conv2d(64, d, 3, 2, 1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.face_proj = nn.Linear(d, d)
        self.null_face = nn.Parameter(torch.zeros(d))  # the face token of a dancer M2P is not told about
        self.face_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, embed_dim))
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(d)
        K = hypotheses
        self.offset_head = nn.Linear(d, K * joints * 2)  # offsets from the reference joints (normalised coords)
        self.residual_head = nn.Linear(d, K * joints * 2 * heatmap)  # x logits, then y logits
        part, root = parts if parts is not None else (torch.zeros(joints).long(), -torch.ones(joints).long())
        self.register_buffer("part", part, persistent=False)  # (J,) body part of each joint
        self.register_buffer("root", root, persistent=False)  # (J,) the torso joint a limb joint hangs from
        self.P = int(part.max()) + 1
        self.choice_head = nn.Linear(d, self.P * K)  # from the window's mean token
        self.log_width = nn.Parameter(torch.zeros(joints))  # Gaussian width per joint, in heatmap cells (exp)
        # dance is smooth: the offsets are low-passed in time (a fixed Gaussian of 2 frames), so
        # that per-frame feature spikes (onset/beat one-hots) cannot make the joints jitter
        k = torch.exp(-torch.arange(-4, 5.0) ** 2 / (2 * 2.0**2))
        self.register_buffer("smooth", (k / k.sum()).expand(K * joints * 2, 1, 9).clone(), persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        nn.init.normal_(self.pos, std=0.02)
        for head in (self.offset_head, self.residual_head, self.choice_head):  # start at the reference pose
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        if self.K > 1:  # equal hypotheses would stay equal (winner-takes-all ties): ~0.2 heatmap cells apart
            nn.init.normal_(self.offset_head.weight, std=0.2 / self.H / self.offset_head.in_features**0.5)

    def forward(self, music, ref_pose, face, drop_face=None):
        # drop_face (True: all, or [B] bool): the dance does not see these faces, the face embedding does;
        # sampling a new dancer drops it: a face M2P never saw names no style it knows
        B, T, _ = music.shape
        assert T <= self.pos.shape[0], f"window of {T} frames, positions only for {self.pos.shape[0]}"
        face = F.interpolate(face, size=(self.face_size, self.face_size), mode="bilinear", antialias=True,
                             align_corners=False)  # (B, 3, face_size, face_size)
        f = self.face_cnn(face * 2 - 1)  # (B, d)
        pose_in = torch.cat([ref_pose[..., :2] - 0.5, ref_pose[..., 2:]], -1).flatten(1)  # (B, J * 3)
        face_token = self.face_proj(f)  # (B, d)
        if drop_face is True:
            face_token = self.null_face.expand(B, -1)
        elif drop_face is not None:
            face_token = torch.where(drop_face[:, None], self.null_face, face_token)
        cond = self.pose_proj(pose_in) + face_token  # (B, d)
        x = self.music_proj((music - self.music_mean) / self.music_std)  # (B, T, d)
        x = x + F.gelu(rearrange(self.music_conv(rearrange(x, "b t d -> b d t")), "b d t -> b t d"))
        x = x + self.pos[:T] + cond[:, None]  # (B, T, d)
        ckpt = self.grad_checkpoint and self.training
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if ckpt else block(x)
        x = self.norm(x)
        offset = rearrange(self.offset_head(x), "b t kjc -> b kjc t")  # (B, K * J * 2, T)
        offset = F.conv1d(F.pad(offset, (4, 4), mode="replicate"), self.smooth, groups=offset.shape[1])
        offset = rearrange(offset, "b (k j c) t -> b k t j c", k=self.K, c=2)  # (B, K, T, J, 2)
        mu = (ref_pose[:, None, None, :, :2] + offset) * self.H - 0.5  # (B, K, T, J, 2) in cells (centres at i)
        cells = torch.arange(self.H, device=x.device, dtype=x.dtype)
        scale = (-self.log_width).exp()[:, None, None] * 0.5**0.5  # (J, 1, 1): 1 / (width sqrt 2)
        res = rearrange(self.residual_head(x), "b t (k j c h) -> b k t j c h", k=self.K, j=self.J, c=2)
        dist = (cells - mu[..., None]) * scale  # (B, K, T, J, 2, H)
        # which hypothesis wins flips while they learn apart: that target does not shape the features
        choice = rearrange(self.choice_head(x.detach().mean(1)), "b (p k) -> b p k", k=self.K)  # (B, P, K)
        embedding = F.normalize(self.face_head(f), dim=-1)  # (B, 512)
        return res - dist * dist, choice, embedding  # the Gaussian's log, -(d / width)^2 / 2, plus the residual


# The face recognizer, in the layout of insightface's arcface_torch `iresnet.py` so that its
# `backbone.pth` files (iresnet18/34/50/100, glintr100 = iresnet100) load key for key.
def m2p_encoder(music_dim, parts, preset, window, grad_checkpoint=False):
    """The M2P encoder of an M2P_CONFIGS preset for joints of body `parts` (data.body_parts) and training
    windows of `window` frames (its position table covers at least 300 frames: sampling may use longer)."""
    return M2PEncoder(music_dim, len(parts[0]), **M2P_CONFIGS[preset], parts=parts, max_frames=max(300, window),
                      grad_checkpoint=grad_checkpoint)


IRESNET_CONFIGS = {
    "toy": dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64)),  # the toy's ArcFace (frozen, random)
    "iresnet18": dict(layers=(2, 2, 2, 2)),
    "iresnet34": dict(layers=(3, 4, 6, 3)),
    "iresnet50": dict(layers=(3, 4, 14, 3)),
    "iresnet100": dict(layers=(3, 13, 30, 3)),
}


class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x)))))) + identity


class IResNet(nn.Module):
    """ArcFace's IResNet: 112x112 RGB crops in [-1, 1] -> 512-d embeddings (not normalised; the
    face loss compares directions). 4 stride-2 stages take 112 to 7x7 for the fc layer."""

    def __init__(self, layers, widths=(64, 128, 256, 512), num_features=512, dropout=0.0):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-05)
        self.prelu = nn.PReLU(widths[0])
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1])
        self.layer3 = self._make_layer(widths[2], layers[2])
        self.layer4 = self._make_layer(widths[3], layers[3])
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[3] * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        for m in self.modules():  # arcface_torch's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
        nn.init.constant_(self.features.weight, 1.0)

    def _make_layer(self, planes, blocks):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        assert x.shape[-2:] == (112, 112), f"IResNet takes 112x112 face crops, got {tuple(x.shape[-2:])}"
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))  # (B, C * 7 * 7)
        return self.features(self.fc(x))


# ----------------------------------------------------------------------------------------------
# Dance, stages B and C: denoising UNet + ReferenceNet (reference attention), pose guidance,
# identity tokens (CHAMP's recipe with StableAnimator's face tokens), on diffusers building blocks

DANCE_UNET_CONFIGS = {
    # tests: attention in every block, as SD-1.5 (so the ReferenceNet's unused tail is SD's)
    "tiny": dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                 block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D",) * 2,
                 up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=16, attention_head_dim=8,
                 norm_num_groups=8),
    # the toy: pixel space at 32 px; attention (reference + cross) at 8x8 only: at 16x16 too it
    # doubles the CPU step time (bench.py --only=stage_b)
    "toy": dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                cross_attention_dim=64, attention_head_dim=16, norm_num_groups=16),
}


class ReferenceStore:
    """What the ReferenceNet's self-attention layers hand to the denoiser's, by layer name.
    keep (B,) bool or None: per-sample reference dropout (a dropped sample attends as if empty)."""

    def __init__(self):
        self.feats, self.keep = {}, None

    def clear(self):
        self.feats, self.keep = {}, None


class ReferenceAttnProcessor:
    """Self-attention (attn1) with reference injection (Animate Anyone / CHAMP). 'write' (ReferenceNet):
    stores its input, the normalised hidden states, under the layer's name and attends as usual.
    'read' (denoiser): keys/values are [own tokens; the stored tokens of the same-named ReferenceNet
    layer]; an empty store is plain self-attention (the unconditional pass). The store's batch may be
    a divisor of the denoiser's: frames (b f) of one sample share its reference (stage C)."""

    def __init__(self, name, store, mode):
        assert mode in ("read", "write")
        self.name, self.store, self.mode = name, store, mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        assert encoder_hidden_states is None and attention_mask is None, "reference attention is self-attention"
        x, mask = hidden_states, None  # (B, N, C)
        kv = x
        if self.mode == "write":
            self.store.feats[self.name] = x
        elif self.store.feats:
            ref = self.store.feats[self.name]  # (Br, M, C)
            reps = len(x) // len(ref)
            kv = torch.cat([x, ref.repeat_interleave(reps, 0)], 1)  # (B, N + M, C)
            if self.store.keep is not None:  # masked reference keys = an empty store, per sample
                keep = self.store.keep.repeat_interleave(reps, 0)  # (B,)
                own = torch.ones(len(x), x.shape[1], dtype=torch.bool, device=x.device)
                mask = torch.cat([own, keep[:, None].expand(-1, ref.shape[1])], 1)[:, None, None]  # (B,1,1,N+M)
        q = rearrange(attn.to_q(x), "b n (h d) -> b h n d", h=attn.heads)
        k, v = (rearrange(f(kv), "b n (h d) -> b h n d", h=attn.heads) for f in (attn.to_k, attn.to_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, N, d)
        return attn.to_out[1](attn.to_out[0](rearrange(out, "b h n d -> b n (h d)")))


def install_reference_attention(unet, store, mode):
    """Spatial self-attention (attn1, not a motion module's) -> ReferenceAttnProcessor; every other
    processor -> SDPA. Returns the sorted names of the reference layers (the pairing key)."""
    procs, names = {}, []
    for name in unet.attn_processors:
        if ".attn1." in name and "motion_modules" not in name:
            procs[name] = ReferenceAttnProcessor(name, store, mode)
            names.append(name)
        else:
            procs[name] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    return sorted(names)


def referencenet_unused(refnet):
    """Names of the ReferenceNet parameters that never receive a gradient. Only its attn1 inputs are
    read, so everything after the input of the last one is dead: in the last attention of the last up
    block with attention, the last transformer block after norm1 and proj_out; then that block's
    upsampler, every later up block, conv_norm_out and conv_out. (CHAMP freezes all of up_blocks.3,
    which also freezes resnets that do feed the bank.)"""
    i = max(i for i, b in enumerate(refnet.up_blocks) if getattr(b, "attentions", None))
    attn = refnet.up_blocks[i].attentions
    last, tb = f"up_blocks.{i}.attentions.{len(attn) - 1}", len(attn[-1].transformer_blocks) - 1
    dead = [f"{last}.transformer_blocks.{tb}.{m}." for m in ("attn1", "norm2", "attn2", "norm3", "ff")]
    dead += [f"{last}.proj_out.", f"up_blocks.{i}.upsamplers."]
    dead += [f"up_blocks.{j}." for j in range(i + 1, len(refnet.up_blocks))] + ["conv_norm_out.", "conv_out."]
    return sorted(n for n, _ in refnet.named_parameters() if n.startswith(tuple(dead)))


class PoseGuider(nn.Module):
    """Pose heatmaps (B, J, H, W) -> features for the UNet's conv_in output (CHAMP's guidance encoder:
    diffusers' ControlNetConditioningEmbedding, len(channels) - 1 stride-2 steps, zero-initialised
    output: at initialisation the UNet does not see the pose)."""

    def __init__(self, joints, out_channels, channels=(16, 32, 96, 256)):
        super().__init__()
        self.embed = ControlNetConditioningEmbedding(out_channels, joints, tuple(channels))
        self.down = 2 ** (len(channels) - 1)  # heatmaps come at this many x the UNet's resolution

    def forward(self, heatmaps):
        return self.embed(heatmaps)


class PerceiverAttention(nn.Module):
    """Latent tokens attend to [features; latents] (IP-Adapter's resampler attention, as in StableAnimator's
    face encoder; its module names, so its weights load as they are)."""

    def __init__(self, dim, dim_head=64, heads=1):
        super().__init__()
        self.heads, inner = heads, dim_head * heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):  # x (B, N, dim) features, latents (B, n, dim)
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], 1)).chunk(2, -1)  # (B, N + n, inner) each
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (self.to_q(latents), k, v))
        return self.to_out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class FaceTokens(nn.Module):
    """StableAnimator's face encoder (`FusionFaceId`): the 512-d face embedding -> n tokens (MLP + norm),
    which then attend to the CLIP image embedding through a 4-layer perceiver, so the face tokens carry
    the reference image's look beside the identity. The perceiver's output projection starts at zero
    (so do the tokens, as in StableAnimator); they are appended to the CLIP token as cross-attention
    context. Module names are StableAnimator's (`proj`, `norm`, `fusion_model.*`)."""

    def __init__(self, dim, n=4, embed_dim=512, depth=4, dim_head=64, ff_mult=4):
        super().__init__()
        self.n = n
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim * 2), nn.GELU(), nn.Linear(embed_dim * 2, n * dim))
        self.norm = nn.LayerNorm(dim)
        self.fusion_model = FacePerceiver(dim, depth, dim_head, max(1, dim // 64), ff_mult)

    def forward(self, emb, clip_emb):  # emb (B, 512), clip_emb (B, dim) -> (B, n, dim)
        tokens = self.norm(rearrange(self.proj(emb), "b (n d) -> b n d", n=self.n))
        return self.fusion_model(tokens, clip_emb[:, None])


class FacePerceiver(nn.Module):
    """StableAnimator's `FacePerceiver` with its embedding width = the UNet's (the CLIP projection)."""

    def __init__(self, dim, depth, dim_head, heads, ff_mult):
        super().__init__()
        self.proj_in, self.proj_out, self.norm_out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.LayerNorm(dim)
        ff = lambda: nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),  # noqa: E731
                                   nn.Linear(dim * ff_mult, dim, bias=False))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(dim, dim_head, heads), ff()])
                                    for _ in range(depth))
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, latents, x):  # latents (B, n, dim), x (B, N, dim)
        x = self.proj_in(x)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class DanceNet(nn.Module):
    """Stage B's trainable modules as one module (one DDP wrapper): the denoising UNet, the ReferenceNet
    (paired with it by layer name through a shared store), the pose guider and the face tokens.
    `reference` runs the ReferenceNet once per sample (t = 0, clean reference); `denoise` is one
    denoiser call; forward = both (training)."""

    def __init__(self, unet, referencenet, guider, face_tokens):
        super().__init__()
        self.unet, self.referencenet, self.guider, self.face_tokens = unet, referencenet, guider, face_tokens
        self.store = ReferenceStore()
        self.install()

    def install(self):
        """(Re)installs the reference processors (after anything that resets them, e.g. from_unet2d)."""
        read = install_reference_attention(self.unet, self.store, "read")
        write = install_reference_attention(self.referencenet, self.store, "write")
        if read != write:
            raise InputError(f"the UNet and the ReferenceNet do not pair by layer name: "
                             f"{sorted(set(read) ^ set(write))[:4]}")
        return read

    def context(self, clip_emb, face_emb, keep):
        """CLIP image embedding (B, D) + face embedding (B, 512) -> cross-attention context (B, 1 + n, D),
        zero where keep is False (the null condition of training's dropout and of sampling)."""
        ctx = torch.cat([clip_emb[:, None], self.face_tokens(face_emb, clip_emb)], 1)  # (B, 1 + n, D)
        return ctx * keep[:, None, None].to(ctx.dtype)

    def reference(self, ref, context, keep):
        self.store.clear()
        t0 = torch.zeros(len(ref), device=ref.device, dtype=torch.long)
        self.referencenet(ref, t0, encoder_hidden_states=context)  # fills the store; its output is unused
        self.store.keep = keep

    def denoise(self, x, t, heatmaps, cond_scale, context):
        """x (B, C, h, w) and heatmaps (B, J, H, W); with stage C's motion UNet x (B, C, F, h, w) and
        heatmaps (B, F, J, H, W): the F frames of a sample share its reference and context."""
        if x.dim() == 5:
            heatmaps = rearrange(heatmaps, "b f j h w -> (b f) j h w")
            context = context.repeat_interleave(x.shape[2], 0)  # (B F, L, D): UNetMotionModel wants it per frame
        feats = self.guider(heatmaps) * cond_scale  # (B [F], C0, h, w): added to conv_in's output
        hook = self.unet.conv_in.register_forward_hook(lambda mod, inp, out: out + feats.to(out.dtype))
        try:
            return self.unet(x, t, encoder_hidden_states=context).sample
        finally:
            hook.remove()

    def forward(self, x, t, heatmaps, cond_scale, ref, clip_emb, face_emb, keep):
        """Training: the store keeps the reference until the caller clears it after backward, where
        gradient checkpointing recomputes the denoiser's blocks and reads it again."""
        context = self.context(clip_emb, face_emb, keep)
        self.reference(ref, context, keep)
        return self.denoise(x, t, heatmaps, cond_scale, context)


def motion_unet(unet, adapter=None, max_frames=32, heads=4):
    """Stage C's denoiser: the stage-B UNet with AnimateDiff motion modules (diffusers MotionAdapter ->
    UNetMotionModel.from_unet2d). adapter: AnimateDiff weights (load_motion_adapter) or None (a new one
    shaped like the UNet, position table of max_frames). A new adapter's proj_out is zeroed, so the
    model starts as the stage-B UNet applied frame by frame; loaded weights are kept as they are.
    Its input is (B, C, F, H, W). from_unet2d resets the attention processors: reinstall the reference
    ones (DanceNet.install)."""
    c = unet.config
    if adapter is None:
        adapter = MotionAdapter(block_out_channels=tuple(c.block_out_channels),
                                motion_layers_per_block=c.layers_per_block, motion_num_attention_heads=heads,
                                motion_norm_num_groups=c.norm_num_groups, motion_max_seq_length=max_frames,
                                use_motion_mid_block=False)
        for name, mod in adapter.named_modules():
            if re.search(r"motion_modules\.\d+$", name):
                nn.init.zeros_(mod.proj_out.weight)
                nn.init.zeros_(mod.proj_out.bias)
    return UNetMotionModel.from_unet2d(unet, adapter)


def clip_image_embeds(clip, images):
    """Frozen CLIP: images (B, 3, H, W) in [0, 1] -> embeddings (B, D); resized to its input size (bicubic,
    antialiased: torchvision's resize, FaceLift's preprocessing) and normalised with CLIP's statistics."""
    size = clip.config.vision_config.image_size if hasattr(clip.config, "vision_config") else clip.config.image_size
    px = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor([0.4815, 0.4578, 0.4082], device=px.device)[:, None, None]
    std = torch.tensor([0.2686, 0.2613, 0.2758], device=px.device)[:, None, None]
    return clip((px - mean) / std).image_embeds


def to_model_space(vae, images, generator=None):
    """Images (B, 3, H, W) in [0, 1] -> what the UNet denoises: pixels in [-1, 1] (vae None, the toy) or
    SD latents (posterior samples x the VAE's scaling factor)."""
    x = images * 2 - 1
    if vae is None:
        return x
    return vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor


def to_images(vae, x):
    """The inverse of to_model_space -> images in [0, 1] (differentiable: the identity loss goes through it)."""
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample
    return ((x + 1) / 2).clamp(0, 1)


@torch.no_grad()
def sample_frames(net, scheduler, ref, clip_emb, face_emb, heatmaps, cond_scale, shape, num_steps=25,
                  guidance=2.0, generator=None):
    """DDIM with classifier-free guidance: one frame per reference (shape (C, h, w), heatmaps (B, J, H, W)),
    or with stage C's motion UNet one clip (shape (C, F, h, w), heatmaps (B, F, J, H, W)). ref (B, C, h, w)
    in model space, clip_emb (B, D), face_emb (B, 512). The unconditional half gets exactly
    training's null condition: reference masked out of the attention, CLIP and face tokens zeroed; the
    pose stays. The ReferenceNet runs once. Returns (B, *shape) in model space."""
    B, dev = len(ref), ref.device
    x = randn_tensor((B, *shape), generator=generator, device=dev, dtype=ref.dtype) * scheduler.init_noise_sigma
    cfg = guidance != 1.0
    keep = torch.cat([torch.ones(B, dtype=torch.bool, device=dev)] + ([torch.zeros(B, dtype=torch.bool, device=dev)]
                                                                      if cfg else []))
    n = len(keep)  # B or 2B: conditional, then unconditional
    context = net.context(clip_emb.repeat(n // B, 1), face_emb.repeat(n // B, 1), keep)
    net.reference(ref.repeat(n // B, 1, 1, 1), context, keep)
    heat = heatmaps.repeat(n // B, *[1] * (heatmaps.dim() - 1))
    scheduler.set_timesteps(num_steps, device=dev)
    try:
        for t in scheduler.timesteps:
            out = net.denoise(x.repeat(n // B, *[1] * len(shape)), t.expand(n), heat, cond_scale, context)
            if cfg:
                out_c, out_u = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    finally:
        net.store.clear()
    return x
