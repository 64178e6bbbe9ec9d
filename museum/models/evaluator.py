"""The evaluator: a small CLIP-style image/text model of the rendered world.

It plays the role a real CLIP (and DINO, and Inception for KID) plays in the
personalisation papers: it is trained contrastively (InfoNCE, Radford et al. 2021) on the
WHOLE world, held-out pools included, so it can recognise concepts that the base model
has never seen. It gives

* image embeddings for image alignment (CLIP-I),
* text embeddings for text alignment (CLIP-T),
* unnormalised image features for KID (``feature_extractor``).

The text tower is transformers' ``CLIPTextModelWithProjection``; the image tower is a
four-layer CNN, which learns 32x32 renders far faster on a CPU than a ViT would.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

EMBED_DIM = 128
IMAGE_SIZE = 32


class ImageEncoder(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, EMBED_DIM) features, S = ``image_size`` (32 or 64). Keeps a 4x4 spatial map
    so position words matter. At 64 the first convolution has stride 2 unless ``stem_width`` is set: then a
    convolution of that width first reads the image at full resolution (stride 1), which fine patterns need
    (stripes 3-7 pixels wide at 64: ``scripts/check_evaluator_tower.py`` trains each layout to name the pattern),
    at several times the cost of a step."""

    def __init__(self, width: int = 64, embed_dim: int = EMBED_DIM, image_size: int = IMAGE_SIZE, stem_width: int = 0):
        super().__init__()

        def block(cin, cout, stride):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        if image_size not in (32, 64):
            raise ValueError(f"image_size must be 32 or 64, got {image_size}")
        if stem_width and image_size != 64:
            raise ValueError(f"a full-resolution stem is for 64x64 images, got image_size {image_size}")
        if stem_width:
            stem = [block(3, stem_width, 1), block(stem_width, width, 2)]  # 64x64, then 32x32
        else:
            stem = [block(3, width, 1 if image_size == 32 else 2)]  # 32x32
        self.features = nn.Sequential(
            *stem,
            block(width, width, 2),          # 16x16
            block(width, 2 * width, 2),      # 8x8
            block(2 * width, 2 * width, 2),  # 4x4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 2 * embed_dim), nn.SiLU(),
                                  nn.Linear(2 * embed_dim, embed_dim))
        self.image_size = image_size
        self.config = {"width": width, "embed_dim": embed_dim, "image_size": image_size}
        if stem_width:
            self.config["stem_width"] = stem_width  # absent in configs saved before the option: they load as before

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels * 2 - 1))


def to_pixels(images, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images, uint8 arrays (N, H, W, 3) or float tensors (N, 3, H, W) in [0, 1] -> (N, 3, size, size) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.dtype == torch.uint8 or x.max() > 1.5:
            x = x / 255.0
    else:
        if isinstance(images, np.ndarray) and images.ndim == 4:
            arrays = images
        else:
            arrays = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BOX)) if isinstance(im, Image.Image)
                               else np.asarray(im) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(arrays)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x


class Evaluator(nn.Module):
    """CLIP-style evaluator. ``Evaluator.from_pretrained(path)`` loads the shipped one."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, image_encoder: ImageEncoder):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    @classmethod
    def create(cls, tokenizer: CLIPTokenizer, image_size: int = IMAGE_SIZE, **image_encoder) -> "Evaluator":
        """A new evaluator; ``image_encoder`` keywords go to :class:`ImageEncoder` (``width``, ``stem_width``)."""
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=96, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=EMBED_DIM,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        return cls(tokenizer, CLIPTextModelWithProjection(config), ImageEncoder(image_size=image_size, **image_encoder))

    # ------------------------------------------------------------------ embeddings
    def image_features(self, images) -> torch.Tensor:
        """Unnormalised features (the KID feature space)."""
        return self.image_encoder(self.pixels(images).to(self.logit_scale.device))

    def pixels(self, images) -> torch.Tensor:
        """``images`` as the image tower reads them (:func:`to_pixels` at its size)."""
        return to_pixels(images, self.image_encoder.image_size)

    def embed_images(self, images, batch_size: int = 256) -> torch.Tensor:
        x = self.pixels(images)
        out = [self.image_encoder(x[i:i + batch_size].to(self.logit_scale.device)) for i in range(0, len(x), batch_size)]
        return F.normalize(torch.cat(out), dim=-1)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Padded to the longest text only: the causal text tower's embedding (at the end token) does not see
        the padding after it, so this equals padding to the full length, at a fraction of the cost."""
        ids = self.tokenizer(list(texts), padding="longest", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.logit_scale.device)
        return F.normalize(self.text_encoder(ids).text_embeds, dim=-1)

    def contrastive_loss(self, pixels: torch.Tensor, texts: Sequence[str], negatives: Sequence[str] = ()) -> torch.Tensor:
        """Symmetric InfoNCE (CLIP, Radford et al. 2021, eq. in Fig. 3). ``negatives``: extra captions that
        only compete in the image-to-text direction (hard negatives, as NegCLIP: Yuksekgonul et al. 2023)."""
        img = F.normalize(self.image_encoder(pixels), dim=-1)
        candidates = list(texts) + list(negatives)
        txt = self.embed_texts(candidates)
        logits = self.logit_scale.exp().clamp(max=100) * img @ txt.T
        # captions that repeat in the batch (a negative included) are all positives
        same = torch.tensor([[a == b for b in candidates] for a in texts], dtype=torch.float32, device=logits.device)
        image_to_text = F.cross_entropy(logits, same / same.sum(1, keepdim=True))
        square = same[:, :len(texts)]
        text_to_image = F.cross_entropy(logits[:, :len(texts)].T, square / square.sum(1, keepdim=True))
        return 0.5 * (image_to_text + text_to_image)

    @torch.no_grad()
    def classify(self, images, candidates: Sequence[Sequence[str]]) -> list[int]:
        """For image i, the index of its best-matching caption among ``candidates[i]`` (zero-shot reading)."""
        img = self.embed_images(images)
        return [int((self.embed_texts(c) @ img[i]).argmax()) for i, c in enumerate(candidates)]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        state = {f"image_encoder.{k}": v.contiguous() for k, v in self.image_encoder.state_dict().items()}
        state["logit_scale"] = self.logit_scale.detach().reshape(1)
        save_file(state, directory / "image_encoder.safetensors")
        (directory / "config.json").write_text(json.dumps({"image_encoder": self.image_encoder.config}, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "Evaluator":
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
        text_encoder = CLIPTextModelWithProjection.from_pretrained(directory / "text_encoder")
        image_encoder = ImageEncoder(**config["image_encoder"])
        state = load_file(directory / "image_encoder.safetensors")
        image_encoder.load_state_dict({k.removeprefix("image_encoder."): v for k, v in state.items() if k.startswith("image_encoder.")})
        evaluator = cls(tokenizer, text_encoder, image_encoder)
        evaluator.logit_scale.data = state["logit_scale"].reshape(())
        return evaluator.eval().requires_grad_(False)
