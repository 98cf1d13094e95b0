"""Training samples: augmenting patch datasets, the deterministic mixed batch sampler and the DataLoader.

:class:`PatchDataset` + :class:`MixedBatchSampler` feed the trainer: every sample is a pure function of
``(seed, step, slot)`` so a resumed run sees exactly the samples an uninterrupted run would, whatever the number of
DataLoader workers. The workers do the per-sample work (crop, intensity/colour/camera augmentation, the
network-input normalisation); the spatial part is one batched ``grid_sample`` on the training device
(:func:`batch_to_device` with ``augment.warp_batch``, the stored teacher targets warped alike), which keeps data
loading off the critical path on a GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from KDSegmentationLib.errors import InputError
from KDSegmentationLib.tasks import TaskSpec
from KDSegmentationLib.training.augment import (AugPolicy, camera_jitter, crop, ct_intensity, default_policy,
                                                normalise_region, random_affine, slice_intensity)
from KDSegmentationLib.training.teacher_targets import crop_logits


def network_input(arrays: Dict[str, np.ndarray], task: TaskSpec) -> np.ndarray:
    """Whole-case network input without augmentation: CT (1, z, y, x); retina (3, h, w); nodule slices (n, 2, h, w)
    (intensity and the click map at the crop centre)."""
    if task.input_kind == "2d-rgb":
        from KDSegmentationLib.tasks import retina

        return np.asarray(retina.fundus_input(arrays["image"], arrays["fov"]), np.float32)
    if task.spatial_dims == 3:
        from KDSegmentationLib.tasks import ct

        return np.asarray(ct.ct_window(arrays["image"], task), np.float32)[None]
    from KDSegmentationLib.tasks.lung_nodule import network_stack

    return network_stack(arrays["image"].astype(np.float32) / 255.0)


class PatchDataset:
    """Augmented training samples addressed by key ``(case_index, seed_tuple)`` (see :class:`MixedBatchSampler`).

    ``cases`` are array dicts from :func:`load_arrays`; ``labelled`` flags which of them may use their label.
    An item is a dict of tensors:

    - ``image`` float16 (C, *region): network input (CT window / fundus normalisation / slice [0, 1]) with intensity
      augmentation, ``region`` = ``patch`` x ``policy.region_factor``;
    - ``label`` uint8 (*region) (zeros when unlabelled), ``soft`` float16 (2, *region) when soft labels are asked for;
    - ``teacher`` float16 (classes, *region): the stored teacher log-probabilities of the same window, when the cases
      hold them (``teacher_targets.store_teacher_logits``);
    - ``theta`` float32 (d, d+1) the spatial augmentation for :func:`warp_batch`; ``labelled`` bool.
    """

    def __init__(self, cases: Sequence[Dict[str, np.ndarray]], labelled: Sequence[bool], task: TaskSpec,
                 patch: Sequence[int], policy: Optional[AugPolicy] = None, soft_labels: bool = False,
                 augment: bool = True):
        self.cases = list(cases)
        self.labelled = [bool(x) and "label" in c for x, c in zip(labelled, self.cases)]
        self.task = task
        self.patch = tuple(int(p) for p in patch)
        self.policy = policy or default_policy(task)
        self.soft_labels = soft_labels
        self.augment = augment
        self.region = tuple(int(math.ceil(p * self.policy.region_factor / 2) * 2) for p in self.patch) \
            if augment else self.patch
        self.is_slices = task.spatial_dims == 2 and task.input_kind != "2d-rgb"
        # retina: the FOV diameter of each photo (for normalising crops) and the whole-photo network input, which
        # samples without camera jitter crop directly (~1 ms instead of ~15 ms of normalisation)
        self._diameter: List[float] = []
        self._normalised: List[np.ndarray] = []
        if task.input_kind == "2d-rgb":
            from KDSegmentationLib.tasks.retina import fov_diameter

            for c in self.cases:
                self._diameter.append(fov_diameter(c["fov"]) if c["fov"].any() else float(max(c["fov"].shape)))
                self._normalised.append(network_input(c, task).transpose(1, 2, 0).astype(np.float16))
        # foreground voxels per class, found once: the crop centres of foreground-oversampled patches
        self._fg: List[List[np.ndarray]] = []
        for c, lab in zip(self.cases, self.labelled):
            if not lab:
                self._fg.append([])
            elif self.is_slices:
                per_slice = c["label"].reshape(c["label"].shape[0], -1).any(1)
                self._fg.append([np.flatnonzero(per_slice)])
            else:
                values = [v for v in np.unique(c["label"]) if v > 0]
                self._fg.append([np.flatnonzero(c["label"] == v).astype(np.int64) for v in values])

    def __len__(self) -> int:
        return len(self.cases)

    # -- centre choice ------------------------------------------------------------------------------------------
    def _centre(self, i: int, shape: Tuple[int, ...], rng: np.random.Generator) -> Tuple[int, ...]:
        fg = self._fg[i]
        if fg and rng.random() < self.policy.pos_fraction:
            cls = fg[int(rng.integers(len(fg)))]  # classes equally often: small tumours get their share
            if len(cls):
                return np.unravel_index(int(cls[int(rng.integers(len(cls)))]), shape)
        c = self.cases[i]
        for _ in range(20):  # uniform inside the body / field of view (rejection sampling, no index arrays kept)
            p = tuple(int(rng.integers(s)) for s in shape)
            if self.task.input_kind == "2d-rgb":
                if c["fov"][p]:
                    return p
            elif c["image"][p] > -500:
                return p
        return tuple(int(rng.integers(s)) for s in shape)

    # -- items --------------------------------------------------------------------------------------------------
    def _slice_sample(self, i: int, rng: np.random.Generator):
        """Nodule slices -> (image (2, *region), label or None, soft or None, centre, teacher log-probs (C, h, w))."""
        from KDSegmentationLib.tasks.lung_nodule import click_map

        c, labelled, fg = self.cases[i], self.labelled[i], self._fg[i]
        if fg and len(fg[0]) and rng.random() < self.policy.pos_fraction:
            k = int(fg[0][int(rng.integers(len(fg[0])))])
        else:
            k = int(rng.integers(c["image"].shape[0]))
        hw = c["image"].shape[1:]
        if tuple(hw) == self.patch:  # nodule-centred crops (LIDC): the whole slice
            centre = (hw[0] // 2, hw[1] // 2)
        else:  # larger slices: centred on the nodule when this slice shows it
            fg_px = np.flatnonzero(c["label"][k]) if labelled else np.zeros(0, np.int64)
            centre = np.unravel_index(int(fg_px[int(rng.integers(len(fg_px)))]), hw) if len(fg_px) else \
                tuple(int(rng.integers(s)) for s in hw)
        img = slice_intensity(crop(c["image"][k], centre, self.region), rng, self.augment)[None]
        # the click channel: the crop is centred where the user would click (the nodule), and the spatial
        # augmentation moves it together with the image
        img = np.concatenate([img, click_map(self.region, (self.region[0] // 2, self.region[1] // 2))[None]])
        lab = crop(c["label"][k], centre, self.region) if labelled else None
        soft = None
        if labelled and self.soft_labels:
            s = c["soft"][k] if "soft" in c else c["label"][k]
            fg_s = crop(np.asarray(s, np.float32), centre, self.region)
            soft = np.stack([1 - fg_s, fg_s])
        return img, lab, soft, centre, (c["teacher"][k] if "teacher" in c else None)

    def _fundus_sample(self, i: int, rng: np.random.Generator):
        """Fundus photo -> (image (3, *region), label or None, None, centre, teacher log-probs (C, h, w))."""
        c = self.cases[i]
        centre = self._centre(i, c["fov"].shape, rng)
        if self.augment and rng.random() < self.policy.camera_p:
            rgb = crop(c["image"], centre, self.region)
            fov = crop(c["fov"], centre, self.region, False)
            img = normalise_region(camera_jitter(rgb, fov, rng), fov, self._diameter[i])
        else:
            img = crop(self._normalised[i], centre, self.region).transpose(2, 0, 1)
        lab = crop(c["label"], centre, self.region) if self.labelled[i] else None
        return img, lab, None, centre, c.get("teacher")

    def _ct_sample(self, i: int, rng: np.random.Generator):
        """CT -> (image (1, *region), label or None, None, centre, teacher log-probs (C, z, y, x))."""
        c = self.cases[i]
        centre = self._centre(i, c["image"].shape, rng)
        hu = crop(c["image"], centre, self.region, np.int16(-1024))
        img = ct_intensity(hu, self.task, rng, self.augment)[None]
        lab = crop(c["label"], centre, self.region) if self.labelled[i] else None
        return img, lab, None, centre, c.get("teacher")

    def __getitem__(self, key):
        import torch

        i, seed = key
        rng = np.random.default_rng(seed)
        sample = self._slice_sample if self.is_slices else \
            self._fundus_sample if self.task.input_kind == "2d-rgb" else self._ct_sample
        img, lab, soft, centre, logits = sample(i, rng)
        theta = random_affine(rng, self.policy, self.patch, self.region, self.augment)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(img)).to(torch.float16),
            "label": torch.from_numpy(np.ascontiguousarray(lab if lab is not None
                                                           else np.zeros(self.region, np.uint8))),
            "theta": torch.from_numpy(theta),
            "labelled": torch.tensor(self.labelled[i]),
        }
        if logits is not None:
            item["teacher"] = torch.from_numpy(crop_logits(logits, centre, self.region))
        if self.soft_labels:
            if soft is None:
                soft = np.zeros((2,) + self.region, np.float32)
                soft[0] = 1.0
            item["soft"] = torch.from_numpy(np.ascontiguousarray(soft)).to(torch.float16)
        return item


@dataclass
class DeviceBatch:
    """A batch on the device after its spatial augmentation: x (B, C, *patch); target: labels (B, *patch) or soft
    labels (B, 2, *patch); labelled flags (B,); the teacher's stored log-probabilities of the same view
    (B, classes, *patch) or None (the teacher runs online)."""

    x: Any                 # torch.Tensor
    target: Any            # torch.Tensor
    labelled: List[bool]
    teacher_logits: Any    # torch.Tensor or None


def batch_to_device(batch: Dict[str, Any], patch, pad_mode: str, device, soft: bool,
                    channels_last: bool) -> DeviceBatch:
    """Move a collated batch to the device and apply its spatial augmentation there (one affine per sample, the
    same for the image, its labels and the stored teacher targets)."""
    import torch

    from KDSegmentationLib.training.augment import warp_batch
    from KDSegmentationLib.training.teacher_targets import warp_logits

    nb = device.type == "cuda"
    image = batch["image"].to(device, non_blocking=nb)
    theta = batch["theta"].to(device, non_blocking=nb)
    label = batch["label"].to(device, non_blocking=nb)
    soft_t = batch["soft"].to(device, non_blocking=nb) if soft else None
    teacher = None
    with torch.no_grad():
        x, y, s = warp_batch(image, theta, patch, label=None if soft else label, soft=soft_t, pad_mode=pad_mode)
        if "teacher" in batch:
            teacher = warp_logits(batch["teacher"].to(device, non_blocking=nb), theta, patch)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labelled = [bool(v) for v in batch["labelled"].tolist()]
    return DeviceBatch(x, s if soft else y, labelled, teacher)


class MixedBatchSampler:
    """Deterministic batches of ``(case_index, seed)`` keys, mixing labelled and unlabelled cases.

    Global step ``g`` on rank ``r`` holds ``n_l`` labelled and ``n_u = round(batch * unlabelled_fraction)``
    unlabelled keys (all labelled when there are no unlabelled cases, all unlabelled when there are no labelled
    ones). Each stream walks through fresh seeded permutations of its cases, so every case is seen equally often,
    and every key depends only on ``(seed, g, r, slot)``: restarting at ``start_step`` reproduces the same data.
    Unlabelled case indices follow the labelled ones in the dataset (``n_labelled + j``).
    """

    def __init__(self, n_labelled: int, n_unlabelled: int, batch_size: int, total_steps: int, seed: int = 0,
                 start_step: int = 0, rank: int = 0, world_size: int = 1, unlabelled_fraction: float = 0.5):
        if n_labelled + n_unlabelled == 0:
            raise InputError("no training cases")
        self.n_l, self.n_u = n_labelled, n_unlabelled
        self.batch_size, self.total_steps, self.seed = batch_size, total_steps, seed
        self.start_step, self.rank, self.world = start_step, rank, world_size
        if n_unlabelled == 0:
            self.per_l = batch_size
        elif n_labelled == 0:
            self.per_l = 0
        else:
            self.per_l = min(batch_size - 1, max(1, batch_size - int(round(batch_size * unlabelled_fraction))))
        self.per_u = batch_size - self.per_l
        self._perm_cache: Dict[int, Tuple[int, np.ndarray]] = {}

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)

    def _case(self, stream: int, n: int, draw: int) -> int:
        cycle, pos = divmod(draw, n)
        cached = self._perm_cache.get(stream)
        if cached is None or cached[0] != cycle:  # only the current cycle of each stream is kept
            cached = (cycle, np.random.default_rng([self.seed, 7 + stream, cycle]).permutation(n))
            self._perm_cache[stream] = cached
        return int(cached[1][pos])

    def batch(self, step: int) -> List[Tuple[int, Tuple[int, ...]]]:
        keys = []
        for stream, n, per, offset in ((0, self.n_l, self.per_l, 0), (1, self.n_u, self.per_u, self.n_l)):
            for j in range(per):
                draw = (step * self.world + self.rank) * per + j
                case = self._case(stream, n, draw)
                keys.append((offset + case, (self.seed, step, self.rank, stream, j)))
        return keys

    def __iter__(self) -> Iterator[List[Tuple[int, Tuple[int, ...]]]]:
        for step in range(self.start_step, self.total_steps):
            yield self.batch(step)


def worker_init(_worker_id: int) -> None:
    """DataLoader worker set-up: the main process alone handles Ctrl-C/SIGTERM (it stops cleanly after the current
    step and shuts the workers down); workers that died on the signal would turn a clean stop into a crash."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset: PatchDataset, sampler: MixedBatchSampler, workers: int, device):
    """A DataLoader over ``sampler``'s batches; pinned memory on CUDA."""
    from torch.utils.data import DataLoader

    kwargs: Dict[str, Any] = {}
    if workers > 0:
        # persistent: workers (and their copy of the arrays) live for the whole run; deep prefetch keeps the GPU fed
        kwargs.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=worker_init)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                      **kwargs)
