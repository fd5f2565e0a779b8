"""``WorldPlayer``: interactive, chunk-by-chunk generation from a bundle (a thin layer over ``Rollout``).

    player = WorldPlayer.from_bundle("outputs/demo/export/bundle", device="cuda", dtype="bf16")
    first = player.reset("street.png", prompt="a rainy street")  # frames of nothing yet: the image as used
    frames = player.step("w")              # hold W for one chunk -> uint8 [F, H, W, 3]
    frames = player.step("w+right")        # forward while turning right
    frames = player.step(motion=rel)       # or pose increments [n, 4, 4] (camera frame of the last latent)
    frames = player.step(poses=c2w)        # or absolute poses [n, 4, 4] in the frame of the first latent

Every ``step`` generates one unit of the bundle's rollout (a chunk of ``chunk_size`` latents in
``ar`` mode, a window of ``window_latents`` in ``window`` mode) with the rollout sampler's streaming
API (``Rollout.start`` / ``Rollout.step``): the memory, KV cache, schedule and guidance are the
sampler's. Latent 0 is the conditioning image's camera (identity pose, action 0), so the first step
takes ``unit - 1`` moves and later steps ``unit`` (:attr:`WorldPlayer.moves_needed`). Actions come
from the poses with the bundle's training thresholds (``infer.trajectory`` explains why).

Decoding is per step and streamed: the autoencoder's :class:`~models.autoencoders.StreamDecoder`
decodes only the new latents, carrying its causal layers' caches from the previous steps, so the
frames equal decoding the whole video at once (float rounding aside). ``reset`` starts a new
stream; ``reset_video`` runs the history latents through it first. An autoencoder without a
streaming decoder falls back to decoding the new latents together with up to ``decode_overlap``
earlier ones and keeping the new frames. Every phase is timed with device synchronisation
(:mod:`infer.timing`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from data.actions import NUM_KEYS, keys_to_motion, keys_to_poses, poses_to_keys
from data.geometry import invert_rigid, is_rigid, normalize_intrinsics, rebase_to_first
from data.latents import latent_action_ids, latent_intrinsics, latent_keys_from_frames, latent_poses
from data.latents import num_frames as frames_of_latents
from data.poseio import parse_pose_string
from data.transforms import crop_box, crop_resize_frames, crop_resize_intrinsics
from infer.config import PlayerConfig, VideoSettings, resolve_settings
from infer.errors import InferError
from infer.image import ImageLike, as_rgb, fit_image, to_uint8_frames, to_video_tensor
from infer.timing import Stopwatch, summarize
from infer.trajectory import default_intrinsics
from models.autoencoders import StreamDecoder
from models.bundle import Bundle, load_bundle, read_bundle_config
from models.lora import merge_adapter
from models.rollout import Rollout, RolloutConfig, RolloutState

__all__ = ["WorldPlayer", "ChunkTiming"]

_TORCH_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class ChunkTiming:
    """One step(): which latents it made, how much context it attended to and how long each phase took."""

    index: int
    start: int  # index of its first latent
    num_latents: int
    num_frames: int
    context_latents: int  # latents of reconstituted memory the chunk attended to
    model_s: float  # context selection + cache fill + denoising (Rollout.step)
    decode_s: float  # autoencoder decode + copy to host
    total_s: float  # the whole step() call


class WorldPlayer:
    """Streams video from a bundle: ``reset(image, prompt)`` then ``step(...)`` per chunk; see the module docstring."""

    def __init__(
        self,
        bundle: Bundle,
        config: Optional[PlayerConfig] = None,
        *,
        settings: Optional[tuple[RolloutConfig, VideoSettings]] = None,
        load_seconds: float = float("nan"),
    ):
        self.bundle = bundle
        self.cfg = config or PlayerConfig()
        self.device = torch.device(self.cfg.device)
        where = f"bundle {bundle.path}"
        self.rollout_cfg, self.video = settings or resolve_settings(bundle.sampling, self.cfg, where)
        ae = bundle.autoencoder
        if ae is None:
            raise InferError(f"{where}: loaded without its autoencoder; the player needs it to encode and decode")
        s = ae.spatial_stride
        if self.video.height % s or self.video.width % s:
            raise InferError(
                f"{where}: video size {self.video.height}x{self.video.width} is not a multiple of the autoencoder's "
                f"spatial stride {s}"
            )
        model_channels = getattr(getattr(bundle.model, "cfg", None), "latent_channels", ae.latent_channels)
        if model_channels != ae.latent_channels:
            raise InferError(
                f"{where}: the model expects {model_channels} latent channels, the autoencoder makes {ae.latent_channels}"
            )
        self.rollout = Rollout(bundle.model, self.rollout_cfg)
        self.load_seconds = load_seconds
        self.reset_seconds = float("nan")
        self._state: Optional[RolloutState] = None
        self._generator: Optional[torch.Generator] = None
        self._image: Optional[np.ndarray] = None
        self._K0 = torch.eye(3, dtype=torch.float64)
        self._seed: Optional[int] = None
        self._prompt: Optional[str] = None
        self._negative_prompt: Optional[str] = None
        self._start: dict[str, Any] = {}
        self._stream: Optional[StreamDecoder] = None  # made by the first reset; None: no streaming decoder
        try:
            self._stream = ae.stream_decoder()
        except NotImplementedError:
            pass
        self._reset_history()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_bundle(
        cls, directory: Union[str, os.PathLike], config: Optional[PlayerConfig] = None, **fields_: Any
    ) -> "WorldPlayer":
        """Load a bundle and build a player; keyword arguments override ``config`` fields (device=, dtype=, ...).

        The sampling section is checked before any weights are read. With ``offload`` the bundle is
        loaded on CPU and only the DiT moves to the device. ``load_seconds`` covers all of it.
        """
        known = {f.name for f in fields(PlayerConfig)}
        bad = sorted(set(fields_) - known)
        if bad:
            raise TypeError(f"WorldPlayer.from_bundle: unknown settings {bad}; PlayerConfig has {sorted(known)}")
        cfg = replace(config or PlayerConfig(), **fields_)
        settings = resolve_settings(read_bundle_config(directory)["sampling"], cfg, f"bundle {directory}")
        with Stopwatch(cfg.device) as sw:
            dtype = _TORCH_DTYPES[cfg.dtype]
            # with an adapter the base is what init= started the LoRA run from (model.safetensors); weights picks the adapter
            bundle = load_bundle(directory, device="cpu" if cfg.offload else cfg.device,
                                 weights="model" if cfg.adapter else cfg.weights, dtype=None if cfg.adapter else dtype)
            if cfg.adapter:  # fold the LoRA adapter in at full precision, then cast
                merge_adapter(bundle.model, cfg.adapter, cfg.weights)
                if dtype is not None:
                    bundle.model.to(dtype=dtype)
            if cfg.offload:
                bundle.model.to(cfg.device)
        return cls(bundle, cfg, settings=settings, load_seconds=sw.seconds)

    # ------------------------------------------------------------------ properties
    @property
    def height(self) -> int:
        return self.video.height

    @property
    def width(self) -> int:
        return self.video.width

    @property
    def fps(self) -> float:
        return self.video.fps

    @property
    def unit(self) -> int:
        """Latents generated per step()."""
        return self.rollout_cfg.unit

    @property
    def temporal_stride(self) -> int:
        return self.bundle.autoencoder.temporal_stride

    @property
    def num_latents(self) -> int:
        """Latents generated since reset()."""
        return self._c2w.shape[0]

    @property
    def num_frames(self) -> int:
        return 0 if self.num_latents == 0 else frames_of_latents(self.num_latents, self.temporal_stride)

    @property
    def moves_needed(self) -> int:
        """Moves the next step() takes: unit - 1 for the first chunk (latent 0 is the image), then unit."""
        return self.unit - 1 if self.num_latents == 0 else self.unit

    @property
    def poses(self) -> Tensor:
        """c2w [N, 4, 4] float64 of every generated latent (latent 0 = identity)."""
        return self._c2w.clone()

    @property
    def intrinsics(self) -> Tensor:
        """Normalised K [N, 3, 3] float64 of every generated latent."""
        return self._K.clone()

    @property
    def actions(self) -> Tensor:
        """Action ids [N] int64 of every generated latent."""
        return self._actions.clone()

    @property
    def latents(self) -> Tensor:
        """Clean latents [1, C, N, h, w] of the video so far."""
        if self._state is None:
            raise InferError("WorldPlayer: call reset() first")
        return self._state.latents

    @property
    def image(self) -> Optional[np.ndarray]:
        """The conditioning image as the model saw it (cropped and resized), uint8 [H, W, 3]."""
        return self._image

    # ------------------------------------------------------------------ session
    def reset(
        self,
        image: ImageLike,
        prompt: Optional[str] = None,
        *,
        K: Optional[Tensor] = None,
        seed: Optional[int] = None,
        negative_prompt: Optional[str] = None,
    ) -> np.ndarray:
        """Start a new video from ``image`` (path or RGB array) and ``prompt`` (None = no text tokens).

        K: normalised intrinsics [3, 3] of latent 0 (default: the bundle's camera, see
        ``infer.trajectory.default_intrinsics``); later steps reuse the last K unless given one.
        Returns the image as the model sees it (uint8 [H, W, 3]).
        """
        with Stopwatch(self.device) as sw:
            rgb = fit_image(as_rgb(image), self.height, self.width)
            K0 = self._check_K(K, 1, "reset")[0] if K is not None else default_intrinsics(self.height, self.width, self.video.fov_x_deg)
            negative = negative_prompt if negative_prompt is not None else self.video.negative_prompt
            with torch.inference_mode():
                ae = self.bundle.autoencoder
                with self._resident(ae):
                    z = ae.encode(to_video_tensor(rgb).to(_module_device(ae, self.device)))
                image_latent = z[:, :, 0].to(self.device)
                text, mask = self._encode_prompt(prompt)
                neg, neg_mask = (None, None)
                if self.rollout_cfg.guidance != 1.0 and self.rollout_cfg.uncond_text and negative is not None:
                    neg, neg_mask = self._encode_prompt(negative)
                self._state = self.rollout.start(image_latent, text, mask, neg_text=neg, neg_text_mask=neg_mask)
        self._generator = torch.Generator(device=self.device).manual_seed(int(self.cfg.seed if seed is None else seed))
        self._reset_history()
        self._image, self._K0 = rgb, K0.to(torch.float64)
        self._prompt, self._negative_prompt = prompt, negative
        self._seed = int(self.cfg.seed if seed is None else seed)
        self._start = {"kind": "image"}
        self.reset_seconds = sw.seconds
        return rgb

    def prefix_latents(self, num_frames: int, max_latents: Optional[int] = None) -> int:
        """History latents :meth:`reset_video` keeps of a ``num_frames`` video: whole chunks, at most
        ``max_latents`` (0 when the video is shorter than one chunk)."""
        available = 1 + (int(num_frames) - 1) // self.temporal_stride
        return min(available, available if max_latents is None else int(max_latents)) // self.unit * self.unit

    def reset_video(
        self,
        video: np.ndarray,
        prompt: Optional[str] = None,
        *,
        c2w: Optional[Tensor] = None,
        keys: Optional[Tensor] = None,
        K: Optional[Tensor] = None,
        max_latents: Optional[int] = None,
        seed: Optional[int] = None,
        negative_prompt: Optional[str] = None,
    ) -> np.ndarray:
        """Start from a video: its last frames become the history that the first generated chunk continues.

        video: RGB uint8 frames [F, H, W, 3] of any size, framed like the image (centre crop to the
        bundle's aspect, resize; pixel K follows). The last ``1 + stride * (P - 1)`` frames are used,
        P the largest multiple of :attr:`unit` latents that fits (and at most ``max_latents``), so the
        generated chunks stay aligned with the chunks the memory retrieves. Their latents are encoded
        together and pushed into the rollout's history with ``Rollout.extend`` before any chunk is
        generated, so the memory can retrieve them; latent 0 (the first frame used) is the
        conditioning image, as in training.

        The video's camera, per input frame: ``c2w`` [F, 4, 4] when known (any world frame; re-based
        so latent 0 is the identity); else ``keys`` [F, 8], the held keys, integrated with the
        bundle's per-latent steps (a key counts for a latent when held over most of its frames);
        else the camera is taken as still (identity poses, action 0). ``K``: pixel intrinsics of the
        input frames, [3, 3] or [F, 3, 3] (default: the bundle's camera). Actions come from the
        poses, like every other path. Returns the frames used as the model sees them, uint8
        [F', H, W, 3]: the first F' frames of the session's video.
        """
        frames = np.asarray(video)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or min(frames.shape[:3]) < 1:
            raise InferError(f"reset_video: video must be RGB uint8 frames [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
        if c2w is not None and keys is not None:
            raise InferError("reset_video: give the video's camera as c2w or as keys, not both")
        s, u, (H, W) = self.temporal_stride, self.unit, (self.height, self.width)
        F = frames.shape[0]
        available = 1 + (F - 1) // s
        P = self.prefix_latents(F, max_latents)
        if P < u:
            raise InferError(
                f"reset_video: {F} frames make {available} latents (max_latents={max_latents}); a video start needs at "
                f"least one chunk, {u} latents = {frames_of_latents(u, s)} frames"
            )
        n = frames_of_latents(P, s)
        used = slice(F - n, F)
        box = crop_box(frames.shape[1:3], (H, W))
        if c2w is not None:
            poses = torch.as_tensor(np.asarray(c2w), dtype=torch.float64)
            if poses.shape != (F, 4, 4):
                raise InferError(f"reset_video: c2w must be per-frame poses [{F}, 4, 4], got {list(poses.shape)}")
            bad = (~is_rigid(poses)).nonzero().flatten()
            if len(bad):
                raise InferError(f"reset_video: c2w[{int(bad[0])}] is not a rigid transform")
            c2w_lat, camera = rebase_to_first(latent_poses(poses[used], s)), "poses"
        elif keys is not None:
            held = torch.as_tensor(np.asarray(keys)).bool()
            if held.shape != (F, NUM_KEYS):
                raise InferError(f"reset_video: keys must be per-frame held keys [{F}, {NUM_KEYS}], got {list(held.shape)}")
            c2w_lat, camera = keys_to_poses(latent_keys_from_frames(held[used], s), self.video.steps), "keys"
        else:
            c2w_lat, camera = torch.eye(4, dtype=torch.float64).expand(P, 4, 4).clone(), "still"
        if K is not None:
            K_pix = torch.as_tensor(np.asarray(K), dtype=torch.float64)
            K_pix = K_pix.expand(F, 3, 3) if K_pix.shape == (3, 3) else K_pix
            if K_pix.shape != (F, 3, 3):
                raise InferError(f"reset_video: K must be pixel intrinsics [3, 3] or [{F}, 3, 3], got {list(K_pix.shape)}")
            K_lat = normalize_intrinsics(crop_resize_intrinsics(latent_intrinsics(K_pix[used], s), box, (H, W)), W, H)
            K_lat = self._check_K(K_lat, P, "reset_video")
        else:
            K_lat = default_intrinsics(H, W, self.video.fov_x_deg).expand(P, 3, 3).clone()
        actions = latent_action_ids(c2w_lat, self.video.thresholds)
        negative = negative_prompt if negative_prompt is not None else self.video.negative_prompt

        with Stopwatch(self.device) as sw:
            rgb = crop_resize_frames(frames[used], box, (H, W))
            with torch.inference_mode():
                ae = self.bundle.autoencoder
                with self._resident(ae):
                    z = ae.encode(to_video_tensor(rgb).to(_module_device(ae, self.device)))
                z = z.to(self.device)
                if z.shape[2] != P:
                    raise InferError(f"reset_video: the autoencoder made {z.shape[2]} latents of {n} frames, expected {P}")
                text, mask = self._encode_prompt(prompt)
                neg, neg_mask = (None, None)
                if self.rollout_cfg.guidance != 1.0 and self.rollout_cfg.uncond_text and negative is not None:
                    neg, neg_mask = self._encode_prompt(negative)
                state = self.rollout.start(z[:, :, 0], text, mask, neg_text=neg, neg_text_mask=neg_mask)
                dev = self.device
                self.rollout.extend(state, z, actions[None].to(dev), invert_rigid(c2w_lat).float()[None].to(dev),
                                    K_lat.float()[None].to(dev))
                if self._stream is not None:  # the history's decoder caches, so the first chunk continues them
                    self._stream.reset()
                    with self._resident(ae):
                        self._sync_stream(state, P)
        self._state = state
        self._generator = torch.Generator(device=self.device).manual_seed(int(self.cfg.seed if seed is None else seed))
        self._reset_history(keep_stream=True)  # the stream now holds the history
        self._c2w, self._K, self._actions = c2w_lat, K_lat.to(torch.float64), actions
        self._image, self._K0 = rgb[0], K_lat[0].to(torch.float64)
        self._prompt, self._negative_prompt = prompt, negative
        self._seed = int(self.cfg.seed if seed is None else seed)
        self._start = {"kind": "video", "input_frames": F, "frames": n, "latents": P, "camera": camera}
        self.reset_seconds = sw.seconds
        return rgb

    def set_prompt(self, prompt: Optional[str], negative_prompt: Optional[str] = None) -> None:
        """Change the prompt mid-stream; the text K/V are re-cached at the next step (promptable events)."""
        state = self._require_state()
        with torch.inference_mode():
            text, mask = self._encode_prompt(prompt)
            neg, neg_mask = (None, None)
            negative = negative_prompt if negative_prompt is not None else self.video.negative_prompt
            if self.rollout_cfg.guidance != 1.0 and self.rollout_cfg.uncond_text and negative is not None:
                neg, neg_mask = self._encode_prompt(negative)
        self.rollout.set_prompt(state, text, mask, neg, neg_mask)
        self._prompt = prompt

    def step(
        self,
        keys: Union[None, str, Tensor, np.ndarray] = None,
        *,
        motion: Optional[Tensor] = None,
        poses: Optional[Tensor] = None,
        K: Optional[Tensor] = None,
    ) -> np.ndarray:
        """Generate the next unit of latents and return its frames, uint8 [F_new, H, W, 3].

        Give at most one of: ``keys`` (a move like ``"w+right"`` held for the whole step, a pose
        string like ``"w-2, d-1"`` with exactly :attr:`moves_needed` moves, or bool keys [8] /
        [n, 8]); ``motion`` (relative c2w increments [n, 4, 4] or one [4, 4] repeated); ``poses``
        (absolute c2w [n, 4, 4], frame of latent 0). Nothing = stand still. K: normalised
        intrinsics [3, 3] or [n, 3, 3] of the new latents (default: the last latent's).
        """
        state = self._require_state()
        n = self.moves_needed
        given = [name for name, v in (("keys", keys), ("motion", motion), ("poses", poses)) if v is not None]
        if len(given) > 1:
            raise InferError(f"step: give one of keys, motion or poses, got {given}")
        with Stopwatch(self.device) as total:
            last = self._c2w[-1] if self.num_latents else torch.eye(4, dtype=torch.float64)
            if poses is not None:
                new = self._check_poses(poses, n, "poses")
            else:
                inc = self._check_poses(motion, n, "motion") if motion is not None else keys_to_motion(self._keys(keys, n), self.video.steps)
                new = torch.empty(n, 4, 4, dtype=torch.float64)
                pose = last
                for i in range(n):  # sequential: each increment composes on the last pose
                    pose = pose @ inc[i]
                    new[i] = pose
            K_prev = self._K[-1] if self.num_latents else self._K0
            K_new = self._check_K(K, n, "step") if K is not None else K_prev.expand(n, 3, 3).clone()
            if self.num_latents == 0:
                c2w_chunk = torch.cat([torch.eye(4, dtype=torch.float64)[None], new])
                K_chunk = torch.cat([self._K0[None], K_new])
                actions = latent_action_ids(c2w_chunk, self.video.thresholds)
            else:
                c2w_chunk, K_chunk = new, K_new
                actions = latent_action_ids(torch.cat([last[None], new]), self.video.thresholds)[1:]
            start, L, dev = self.num_latents, c2w_chunk.shape[0], self.device

            with Stopwatch(dev) as model_sw, torch.inference_mode():
                record = self.rollout.step(
                    state, actions[None].to(dev), invert_rigid(c2w_chunk).float()[None].to(dev),
                    K_chunk.float()[None].to(dev), self._generator,
                )
            with Stopwatch(dev) as decode_sw, torch.inference_mode():
                frames = self._decode(state, start, L)
            self._c2w = torch.cat([self._c2w, c2w_chunk])
            self._K = torch.cat([self._K, K_chunk])
            self._actions = torch.cat([self._actions, actions])
        self.chunk_timings.append(ChunkTiming(
            index=len(self.chunk_timings), start=start, num_latents=L, num_frames=int(frames.shape[0]),
            context_latents=int(record.context_idx.shape[-1]), model_s=model_sw.seconds,
            decode_s=decode_sw.seconds, total_s=total.seconds,
        ))
        return frames

    # ------------------------------------------------------------------ records
    def conditioning(self) -> dict[str, Tensor]:
        """What the model was conditioned on, per latent: c2w, K (normalised), actions, keys (implied by the motion)."""
        return {
            "c2w": self.poses, "K": self.intrinsics, "actions": self.actions,
            "keys": poses_to_keys(self._c2w, self.video.thresholds) if self.num_latents else torch.zeros(0, NUM_KEYS, dtype=torch.bool),
        }

    def timings(self) -> dict[str, Any]:
        """Seconds, all measured with device synchronisation.

        load_s: reading the bundle onto the device. reset_s: image crop + encode and prompt encoding.
        time_to_first_chunk_s: reset_s + the first step (image in -> first frames on the host).
        chunk_latency_s / chunk_model_s / chunk_decode_s: summaries (median, p90, ...) over step()
        calls of the whole call / Rollout.step / decode. frames_per_s: frames / (reset + all steps).
        """
        chunks = self.chunk_timings
        gen_s = self.reset_seconds + sum(c.total_s for c in chunks)
        frames = sum(c.num_frames for c in chunks)
        return {
            "load_s": self.load_seconds,
            "reset_s": self.reset_seconds,
            "time_to_first_chunk_s": (self.reset_seconds + chunks[0].total_s) if chunks else float("nan"),
            "chunk_latency_s": summarize([c.total_s for c in chunks]),
            "chunk_model_s": summarize([c.model_s for c in chunks]),
            "chunk_decode_s": summarize([c.decode_s for c in chunks]),
            "generation_s": gen_s,
            "frames": frames,
            "frames_per_s": frames / gen_s if chunks and gen_s > 0 else float("nan"),
            "chunks": [vars(c).copy() for c in chunks],
        }

    def settings(self) -> dict[str, Any]:
        """Every setting the generation used (player config, rollout config, video settings, seed, prompts)."""
        return {
            "player": asdict(self.cfg),
            "rollout": asdict(self.rollout_cfg),
            "video": self.video.to_dict(),
            "seed": self._seed,
            "prompt": self._prompt,
            "negative_prompt": self._negative_prompt,
            "start": dict(self._start),
            "autoencoder": {"kind": self.bundle.config["autoencoder"].get("kind"), "spatial_stride": self.bundle.autoencoder.spatial_stride,
                            "temporal_stride": self.temporal_stride, "latent_channels": self.bundle.autoencoder.latent_channels},
            "num_steps": self.rollout.num_steps,
        }

    # ------------------------------------------------------------------ internals
    def _reset_history(self, keep_stream: bool = False) -> None:
        if self._stream is not None and not keep_stream:
            self._stream.reset()
        self._c2w = torch.zeros(0, 4, 4, dtype=torch.float64)
        self._K = torch.zeros(0, 3, 3, dtype=torch.float64)
        self._actions = torch.zeros(0, dtype=torch.long)
        self.chunk_timings: list[ChunkTiming] = []

    def _require_state(self) -> RolloutState:
        if self._state is None:
            raise InferError("WorldPlayer: call reset(image, prompt) before step()")
        return self._state

    @contextlib.contextmanager
    def _resident(self, module: Optional[nn.Module]) -> Iterator[None]:
        """With ``offload``, move ``module`` to the device for the block and back to CPU after it."""
        if not self.cfg.offload or module is None:
            yield
            return
        module.to(self.device)
        try:
            yield
        finally:
            module.to("cpu")

    def _encode_prompt(self, prompt: Optional[str]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(tokens [1, L, D], mask [1, L] or None when nothing is padding); (None, None) for no prompt."""
        te = self.bundle.text_encoder
        if prompt is None:
            return None, None
        if te is None:
            raise InferError(f"prompt {prompt!r}: the bundle was loaded without its text encoder")
        with self._resident(te):
            try:
                tokens, mask = te.encode([prompt])
            except (KeyError, ValueError) as e:
                raise InferError(f"prompt {prompt!r}: the bundle's {te.name} text encoder cannot encode it: {e}") from None
        if tokens.shape[1] == 0:
            return None, None
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        return tokens, (None if bool(mask.all()) else mask)

    def _decode(self, state: RolloutState, start: int, L: int) -> np.ndarray:
        """Frames uint8 [F_new, H, W, 3] of latents [start, start + L): streamed, or (autoencoders without a
        streaming decoder) decoded with up to decode_overlap earlier latents."""
        ae = self.bundle.autoencoder
        with self._resident(ae):
            if self._stream is not None:
                self._sync_stream(state, start)
                return to_uint8_frames(self._stream.decode(state.latents[:, :, start : start + L].float().to(_module_device(ae, self.device))))
            a = max(0, start - self.cfg.decode_overlap)
            video = ae.decode(state.latents[:, :, a : start + L].float().to(_module_device(ae, self.device)))
        new = frames_of_latents(L, self.temporal_stride) if start == 0 else L * self.temporal_stride
        return to_uint8_frames(video[:, :, -new:])

    def _sync_stream(self, state: RolloutState, upto: int) -> None:
        """Bring the stream decoder to latent ``upto``: when it is elsewhere, restart it and run latents [0, upto)
        through it in chunks of ``unit`` (frames discarded). A no-op in the usual step-after-step case."""
        stream = self._stream
        if stream is None or stream.num_latents == upto:
            return
        stream.reset()
        dev = _module_device(self.bundle.autoencoder, self.device)
        for a in range(0, upto, self.unit):
            stream.decode(state.latents[:, :, a : min(upto, a + self.unit)].float().to(dev))

    def _keys(self, keys: Union[None, str, Tensor, np.ndarray], n: int) -> Tensor:
        """Per-move held keys [n, 8] from None / a move or pose string / bool keys [8] or [n, 8]."""
        if keys is None or n == 0:
            return torch.zeros(n, NUM_KEYS, dtype=torch.bool)
        if isinstance(keys, str):
            text = keys if "-" in keys else f"{keys}-{n}"
            try:
                k = parse_pose_string(text)[1:]
            except ValueError as e:
                raise InferError(f"step: {e}") from None
            if k.shape[0] != n:
                raise InferError(f"step: pose string {keys!r} has {k.shape[0]} moves, this step takes {n}")
            return k
        k = torch.as_tensor(np.asarray(keys)).bool()
        if k.shape == (NUM_KEYS,):
            return k.expand(n, NUM_KEYS).clone()
        if k.shape != (n, NUM_KEYS):
            raise InferError(f"step: keys must be [{NUM_KEYS}] or [{n}, {NUM_KEYS}] (moves this step), got {list(k.shape)}")
        return k

    @staticmethod
    def _check_poses(value: Tensor, n: int, name: str) -> Tensor:
        t = torch.as_tensor(np.asarray(value), dtype=torch.float64)
        if name == "motion" and t.shape == (4, 4):
            t = t.expand(n, 4, 4).clone()
        if t.shape != (n, 4, 4):
            raise InferError(f"step: {name} must be [{n}, 4, 4] (moves this step){' or [4, 4]' if name == 'motion' else ''}, got {list(t.shape)}")
        bad = (~is_rigid(t)).nonzero().flatten()
        if len(bad):
            raise InferError(f"step: {name}[{int(bad[0])}] is not a rigid transform (rotation orthonormal with det +1, last row 0 0 0 1)")
        return t

    @staticmethod
    def _check_K(value: Tensor, n: int, where: str) -> Tensor:
        t = torch.as_tensor(np.asarray(value), dtype=torch.float64)
        if t.shape == (3, 3):
            t = t.expand(n, 3, 3).clone()
        if t.shape != (n, 3, 3):
            raise InferError(f"{where}: K must be normalised intrinsics [3, 3] or [{n}, 3, 3], got {list(t.shape)}")
        if not torch.isfinite(t).all() or (t[:, 0, 0] <= 0).any() or (t[:, 1, 1] <= 0).any():
            raise InferError(f"{where}: K needs finite values and positive fx, fy")
        if (t[:, 0, 0] > 50).any():
            raise InferError(f"{where}: K looks like pixel intrinsics (fx={float(t[0, 0, 0]):.1f}); pass normalised K "
                             "(infer.trajectory.normalized_intrinsics converts pixel K)")
        return t


def _module_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """The device of a module's first parameter or buffer (parameter-free modules: ``fallback``)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return fallback
