"""MONAI SegResNet inference the way SlicerMONAIAuto3DSeg runs an Auto3DSeg SegResNet model (timing only).

Follows the steps of SlicerMONAIAuto3DSeg's `Scripts/auto3dseg_segresnet_inference.py`, one fresh process per image:
torch.load the model file (config + state_dict) -> build the network from the config -> LoadImaged (channel first)
-> float -> Orientationd RAS -> CropForegroundd (margin 10, voxels > 0) -> Spacingd to the model's resolution
(bilinear) -> ScaleIntensityRanged to [-1, 1] + sigmoid (its "ct" normalisation) -> SlidingWindowInfererAdapt
(overlap 0.625, gaussian) -> softmax (double, then float) -> Invertd of the class probabilities to the input grid
(undo spacing, crop and orientation, linear interpolation) -> argmax -> uint8 NIfTI with nibabel.

The model file comes from make_peer_weights.py: Auto3DSeg's SegResNetDS (init_filters 32, blocks_down 1,2,2,4,4,
dsdepth 4) with randomly initialised weights, as many classes as the "Low Res Abdominal organs TS2 - 3mm" model
(24 organs + background). No trained weights can be downloaded here, so only time and memory mean anything.

Usage: python segresnet_infer.py MODEL.pt INPUT OUTPUT.nii.gz [--threads 2]
"""
import argparse
import json
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    t0 = time.perf_counter()
    import nibabel as nib
    import numpy as np
    import torch
    torch.set_num_threads(a.threads)
    from monai.bundle import ConfigParser
    from monai.data import decollate_batch, list_data_collate
    from monai.inferers import SlidingWindowInfererAdapt
    from monai.transforms import (Compose, CropForegroundd, EnsureTyped, Invertd, Lambdad, LoadImaged,
                                  Orientationd, ScaleIntensityRanged, Spacingd)
    from monai.utils import MetaKeys, convert_to_dst_type
    t_import = time.perf_counter()

    checkpoint = torch.load(a.model, map_location="cpu", weights_only=False)
    config = checkpoint["config"]
    model = ConfigParser(config["network"]).get_parsed_content()
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    model = model.to(device="cpu", memory_format=torch.channels_last_3d).eval()
    t_model = time.perf_counter()

    pixdim = list(config["resample_resolution"])
    lo, hi = config["intensity_bounds"]
    transform = Compose([
        LoadImaged(keys="image", ensure_channel_first=True, dtype=None, image_only=False),
        EnsureTyped(keys="image", data_type="tensor", dtype=torch.float),
        Orientationd(keys="image", axcodes="RAS"),
        CropForegroundd(keys="image", source_key="image", margin=10, allow_smaller=True),
        Spacingd(keys=["image"], pixdim=pixdim, mode=["bilinear"], dtype=torch.float,
                 min_pixdim=np.array(pixdim) * 0.75, max_pixdim=np.array(pixdim) * 1.25),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=-1, b_max=1, clip=False),
        Lambdad(keys="image", func=lambda x: torch.sigmoid(x)),
    ])
    inferer = SlidingWindowInfererAdapt(roi_size=config["roi_size"], sw_batch_size=1, overlap=0.625,
                                        mode="gaussian", cache_roi_weight_map=False, progress=False)

    with torch.no_grad():
        batch = transform([{"image": a.input}])
        original_affine = batch[0]["image"].meta[MetaKeys.ORIGINAL_AFFINE]
        batch = list_data_collate([batch])
        data = batch["image"].as_subclass(torch.Tensor).to(memory_format=torch.channels_last_3d)
        t_pre = time.perf_counter()

        logits = inferer(inputs=data, network=model)
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        pred = torch.softmax(logits, dim=1, dtype=torch.double).float()
        logits = None
        t_inf = time.perf_counter()

        invert = Compose([Invertd(keys="pred", orig_keys="image", transform=transform, nearest_interp=False)])
        batch["pred"] = convert_to_dst_type(pred, batch["image"], dtype=pred.dtype, device=pred.device)[0]
        pred = [invert(x)["pred"] for x in decollate_batch(batch)][0]
        seg = torch.argmax(pred, dim=0).to(dtype=torch.uint8)
        t_inv = time.perf_counter()

    nib.save(nib.Nifti1Image(seg.cpu().numpy().astype(np.uint8), affine=original_affine), a.output)
    t_end = time.perf_counter()
    print(json.dumps({"event": "result", "import_s": round(t_import - t0, 3), "model_load_s": round(t_model - t_import, 3),
                      "preprocess_s": round(t_pre - t_model, 3), "inference_s": round(t_inf - t_pre, 3),
                      "invert_argmax_s": round(t_inv - t_inf, 3), "write_s": round(t_end - t_inv, 3),
                      "model_grid": list(data.shape[2:]), "classes": int(pred.shape[0]),
                      "output_grid": list(seg.shape), "roi_size": list(config["roi_size"]),
                      "parameters": sum(x.numel() for x in model.parameters())}))


if __name__ == "__main__":
    main()
