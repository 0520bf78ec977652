"""Policy head networks: what maps a policy's inputs to (normalized) actions.

- `MLPHead`: features ++ proprio (++ instruction) -> action. Behaviour cloning on frozen backbone
  features, the image-only / proprio-only controls, and the oracle (true object state).
- `DiffusionHead`: a diffusion policy over an action chunk (Chi et al. 2023, MLP denoiser).
- `TokenHead`: attention pooling over the backbone's patch tokens (learned queries), then an MLP:
  a head that can read *where* things are, which a single pooled vector may not carry.
- `PixelHead`: the standard from-scratch image policy (robomimic-style): a small CNN, spatial
  softmax keypoints, an MLP; trained end to end on the frames (with random-shift augmentation),
  it reads no backbone: the baseline a pretrained backbone must beat.
- `ObjectHead`: estimates where the instructed object and the plate are (relative to the grasp
  point) from the frames or the backbone's tokens, then acts on that estimate as the oracle acts
  on the true state. Trained with the estimate supervised by the logged object state, so it needs
  logs that record it (simulator, motion capture); at run time it reads only the image.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

HORIZON = 4  # actions per diffusion chunk
CLIP = 5.0  # |normalized action| bound when sampling


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear + GELU layers through `dims`, a plain Linear last."""
    mods: list[nn.Module] = []
    for i, o in itertools.pairwise(dims[:-1]):
        mods += [nn.Linear(i, o), nn.GELU()]
    mods.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*mods)


class MLPHead(nn.Module):
    """features (B, F) ++ proprio (B, P) -> normalized action (B, A)."""

    def __init__(
        self,
        feature_dim: int,
        proprio_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.net = _mlp([feature_dim + proprio_dim] + [hidden] * layers + [action_dim])

    def forward(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, proprio], dim=-1))


class TokenHead(nn.Module):
    """Patch tokens (B, N, D) ++ proprio (B, P) -> normalized action (B, A).

    `queries` learned queries attend over the tokens (one softmax each over the N positions; the
    query can depend on proprio and instruction, so the instruction can pick which object to
    look at), and the pooled vectors feed an MLP with proprio. Each token's grid position
    (x, y in [-1, 1]) is appended to it, so a query also reads *where* it attended (the
    expected position under its attention: a spatial soft-argmax over tokens).
    """

    def __init__(
        self,
        token_dim: int,
        proprio_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 2,
        queries: int = 4,
        key_dim: int = 64,
    ) -> None:
        super().__init__()
        self.queries, self.key_dim = queries, key_dim
        self.key = nn.Linear(token_dim + 2, key_dim)
        self.value = nn.Linear(token_dim, key_dim)
        self.query = nn.Parameter(torch.randn(queries, key_dim) * key_dim**-0.5)
        self.query_cond = nn.Linear(proprio_dim, queries * key_dim) if proprio_dim else None
        out = queries * (key_dim + 2)
        self.net = _mlp([out + proprio_dim] + [hidden] * layers + [action_dim])

    @staticmethod
    def grid(n: int, device: torch.device) -> torch.Tensor:
        """(n, 2) x, y in [-1, 1] of the tokens of a square grid (row-major)."""
        g = round(n**0.5)
        c = (torch.arange(g, device=device, dtype=torch.float32) + 0.5) / g * 2 - 1
        ys, xs = torch.meshgrid(c, c, indexing="ij")
        return torch.stack([xs.flatten(), ys.flatten()], dim=-1)

    def forward(self, tokens: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        xy = self.grid(tokens.shape[1], tokens.device).expand(len(tokens), -1, -1)
        q = self.query.expand(len(tokens), -1, -1)  # (B, Q, K)
        if self.query_cond is not None:
            q = q + self.query_cond(proprio).view(-1, self.queries, self.key_dim)
        keys = self.key(torch.cat([tokens, xy], dim=-1))
        att = (torch.einsum("bqk,bnk->bqn", q, keys) * self.key_dim**-0.5).softmax(dim=-1)
        values = torch.cat([self.value(tokens), xy], dim=-1)  # (B, N, K + 2)
        pooled = torch.einsum("bqn,bnk->bqk", att, values)
        return self.net(torch.cat([pooled.flatten(1), proprio], dim=-1))


class SpatialSoftmax(nn.Module):
    """Feature maps (B, C, H, W) -> expected (x, y) of each channel's softmax (B, 2C), in
    [-1, 1] image coordinates (Levine et al. 2016), with a learned temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        B, C, H, W = maps.shape
        ys = torch.linspace(-1.0, 1.0, H, device=maps.device)
        xs = torch.linspace(-1.0, 1.0, W, device=maps.device)
        p = (maps.flatten(2) / self.log_temperature.exp()).softmax(dim=-1).view(B, C, H, W)
        x = (p.sum(dim=2) * xs).sum(dim=-1)
        y = (p.sum(dim=3) * ys).sum(dim=-1)
        return torch.cat([x, y], dim=-1)


def keypoints(conv: nn.Module, softmax: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 frames (B, 3, S, S) scaled to [-1, 1], through `conv`, to spatial-softmax keypoints."""
    out: torch.Tensor = softmax(conv(images.float() / 127.5 - 1.0))
    return out


class PixelEncoder(nn.Module):
    """RGB frames (B, 3, S, S) uint8 -> spatial-softmax keypoints (B, 2K): four 3x3 conv layers
    to a quarter-resolution map (~25 M multiply-adds at 64 px), one softmax per channel."""

    def __init__(self, channels: int = 32, keypoints: int = 32) -> None:
        super().__init__()
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(3, c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * c, 2 * c, 3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * c, keypoints, 1),
        )
        self.softmax = SpatialSoftmax()
        self.dim = 2 * keypoints

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return keypoints(self.conv, self.softmax, images)


class PixelHead(nn.Module):
    """RGB frames (B, 3, S, S) uint8 ++ proprio (B, P) -> normalized action (B, A): a small CNN,
    spatial-softmax keypoints (`PixelEncoder`), an MLP. Trained from scratch."""

    def __init__(
        self,
        proprio_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 2,
        channels: int = 32,
        keypoints: int = 32,
    ) -> None:
        super().__init__()
        enc = PixelEncoder(channels, keypoints)
        # The encoder's modules sit directly on the head (weights saved as conv.*, softmax.*).
        self.conv, self.softmax = enc.conv, enc.softmax
        self.net = _mlp([enc.dim + proprio_dim] + [hidden] * layers + [action_dim])

    def forward(self, images: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([keypoints(self.conv, self.softmax, images), proprio], dim=-1))


class TokenMapEncoder(nn.Module):
    """Patch tokens (B, N, D) of a square grid -> spatial-softmax keypoints (B, 2K): the tokens
    as a feature map, upsampled 2x, two conv layers, one softmax per channel (what
    `PixelEncoder` does on pixels, on the backbone's map instead; ~10 M multiply-adds for 8 x 8
    tokens of width 128)."""

    def __init__(self, token_dim: int, channels: int = 64, keypoints: int = 32) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(token_dim, channels, 1),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, keypoints, 1),
        )
        self.softmax = SpatialSoftmax()
        self.dim = 2 * keypoints

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, D = tokens.shape
        g = round(N**0.5)
        return self.softmax(self.conv(tokens.transpose(1, 2).reshape(B, D, g, g)))


# The estimate an `ObjectHead` makes, as columns of `oracle_features` (policies.training): the
# instructed object relative to the grasp point (3), the plate relative to it (2), the
# instructed object relative to the plate (2).
ESTIMATE_COLUMNS = (11, 12, 13, 14, 15, 22, 23)
ESTIMATE_UNIT = 10.0  # estimates are in decimetres: positions of order 1, differences exact


class ObjectHead(nn.Module):
    """Frames or patch tokens ++ conditioning (B, P) -> normalized action (B, A), through an
    estimate of where things are.

    The image alone is encoded (`PixelEncoder` keypoints on pixels, `TokenMapEncoder` keypoints
    on the backbone's token map: attention pooling over the 8 x 8 tokens measured 5.1 / 8.6 cm
    where the map gives 2.5 / 1.3 cm, on the same random-init tokens)
    and an MLP proposes where each object slot and the plate are relative to the grasp point
    (which the image shows too); the instruction alone weighs the slots (a softmax), which
    selects the instructed object. The estimate (`ESTIMATE_COLUMNS`, decimetres) is what the
    action MLP reads with the conditioning, as the oracle reads the true state.

    Neither the proposal nor the selection reads proprio: in demonstrations the arm heads for
    the target, so the arm's position predicts the target, and an estimator allowed to read it
    learns that shortcut; in closed loop the arm's errors then feed the estimate (measured: 3 cm
    offline, 11 / 18 cm along the policy's own trajectories). Positions relative to the grasp
    point, both seen in the frame, survive the random-shift augmentation and a moved camera
    better than positions in the world frame.
    """

    def __init__(
        self,
        source: str,
        feature_dim: int,
        cond_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 2,
        language_dim: int = 0,
        slots: int = 3,
    ) -> None:
        super().__init__()
        self.encoder: nn.Module = (
            PixelEncoder() if source == "pixels" else TokenMapEncoder(feature_dim)
        )
        z = int(self.encoder.dim)
        self.slots, self.language_dim = slots, language_dim
        self.propose = _mlp([z, hidden, hidden, slots * 3 + 2])
        self.select = nn.Linear(language_dim, slots) if language_dim else None
        self.net = _mlp([len(ESTIMATE_COLUMNS) + cond_dim] + [hidden] * layers + [action_dim])

    def objects(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, 3) each slot's object, (B, 2) the plate, relative to the grasp point (dm)."""
        out = self.propose(self.encoder(inputs))
        return out[:, : self.slots * 3].view(len(out), self.slots, 3), out[:, self.slots * 3 :]

    def select_logits(self, cond: torch.Tensor) -> torch.Tensor | None:
        """(B, S) which slot the instruction asks for (None without instructions)."""
        if self.select is None:
            return None
        out: torch.Tensor = self.select(cond[:, cond.shape[1] - self.language_dim :])
        return out

    def estimate(self, inputs: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """(B, 7) estimate of `ESTIMATE_COLUMNS`, in decimetres (`ESTIMATE_UNIT`)."""
        return self._estimate(inputs, cond)[0]

    def _estimate(
        self, inputs: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        objects, plate = self.objects(inputs)
        logits = self.select_logits(cond)
        if logits is None:
            w = torch.full(objects.shape[:2], 1.0 / self.slots, device=objects.device)
        else:
            w = logits.softmax(dim=-1)
        target = (w[..., None] * objects).sum(dim=1)
        return torch.cat([target, plate, target[:, :2] - plate], dim=-1), objects

    def forward_with_estimate(
        self, inputs: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(action, estimate, every slot's object) for training."""
        est, objects = self._estimate(inputs, cond)
        return self.net(torch.cat([est, cond], dim=-1)), est, objects

    def forward(self, inputs: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.forward_with_estimate(inputs, cond)[0]


def random_shift(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Random-shift augmentation (DrQ, Kostrikov et al. 2020): pad by replicating the border,
    crop back at a random offset per image. (B, C, S, S) -> same shape."""
    B, _, H, W = images.shape
    padded = nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    rows = dy[:, None] + torch.arange(H)[None]  # (B, H)
    cols = dx[:, None] + torch.arange(W)[None]  # (B, W)
    b = torch.arange(B)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).to(images.dtype)


class DiffusionHead(nn.Module):
    """A diffusion policy head (Chi et al. 2023, MLP denoiser): DDPM over an action chunk of
    `horizon` normalized actions, conditioned on features ++ proprio.

    Training predicts the noise at a random step of a cosine schedule. Inference runs
    deterministic DDIM (eta = 0) from one fixed latent stored with the weights, so a policy is a
    deterministic function of its inputs (audits compare its outputs before and after an
    adapter) and returns the chunk's first action.
    """

    def __init__(
        self,
        feature_dim: int,
        proprio_dim: int,
        action_dim: int,
        hidden: int = 256,
        layers: int = 3,
        horizon: int = HORIZON,
        train_steps: int = 100,
        sample_steps: int = 10,
    ) -> None:
        super().__init__()
        self.action_dim, self.horizon = action_dim, horizon
        self.train_steps, self.sample_steps = train_steps, sample_steps
        self.time_dim = 32
        out = action_dim * horizon
        self.net = _mlp(
            [feature_dim + proprio_dim + out + self.time_dim] + [hidden] * layers + [out]
        )
        s = torch.arange(train_steps + 1, dtype=torch.float64) / train_steps
        f = torch.cos((s + 0.008) / 1.008 * torch.pi / 2) ** 2
        abar = (f[1:] / f[0]).clamp(1e-5, 1.0)
        self.alpha_bar: torch.Tensor
        self.latent: torch.Tensor
        self.register_buffer("alpha_bar", abar.float())
        self.register_buffer("latent", torch.randn(out, generator=torch.Generator().manual_seed(0)))

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-torch.arange(half, device=t.device) * (9.2 / half))
        ang = t.float()[:, None] * freqs[None] * (1000.0 / self.train_steps)
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    def eps(self, cond: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([cond, x, self._time(t)], dim=-1))

    def loss(
        self,
        features: torch.Tensor,
        proprio: torch.Tensor,
        chunk: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noise-prediction MSE for normalized action chunks (B, horizon, A)."""
        x0 = chunk.flatten(1)
        # Drawn on the CPU (where a generator lives), used where the chunk is.
        t = torch.randint(0, self.train_steps, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        ab = self.alpha_bar[t][:, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        cond = torch.cat([features, proprio], dim=-1)
        return ((self.eps(cond, xt, t) - noise) ** 2).mean()

    def sample(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM from the stored latent: normalized chunks (B, horizon, A)."""
        cond = torch.cat([features, proprio], dim=-1)
        x = self.latent.expand(len(cond), -1)
        ts = torch.linspace(self.train_steps - 1, 0, self.sample_steps).round().long().tolist()
        for i, t in enumerate(ts):
            ab = self.alpha_bar[t]
            e = self.eps(cond, x, torch.full((len(x),), t, device=x.device))
            # Clipped like diffusers' clip_sample: at the noisiest steps 1 / sqrt(alpha_bar) is
            # large and an unclipped x0 estimate explodes. Actions are z-scored.
            x0 = ((x - (1 - ab).sqrt() * e) / ab.sqrt()).clamp(-CLIP, CLIP)
            e = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            if i + 1 == len(ts):
                x = x0
            else:
                ab_prev = self.alpha_bar[ts[i + 1]]
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * e
        return x.view(len(cond), self.horizon, self.action_dim)

    def forward(self, features: torch.Tensor, proprio: torch.Tensor) -> torch.Tensor:
        return self.sample(features, proprio)[:, 0]
