"""MONAI SegResNet inference the way SlicerMONAIAuto3DSeg runs an Auto3DSeg SegResNet model (timing only).

Load -> orient to RAS -> 3 mm spacing -> CT intensity scaling -> crop foreground -> sliding window (overlap 0.625,
gaussian) -> invert the class probabilities to the input grid (undo crop, spacing, orientation) -> argmax ->
write a compressed labelmap. The network is Auto3DSeg's SegResNetDS (init_filters 32, blocks_down 1,2,2,4,4) with
randomly initialised weights: no trained weights can be downloaded here, so only time and memory mean anything.

Usage: python segresnet_infer.py INPUT OUTPUT [--classes 3] [--threads 2] [--roi 192 192 128]
"""
import argparse
import json
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--roi", type=int, nargs=3, default=[192, 192, 128])
    p.add_argument("--spacing", type=float, default=3.0)
    a = p.parse_args()
    t0 = time.perf_counter()
    import torch
    torch.set_num_threads(a.threads)
    from monai.inferers import SlidingWindowInferer
    from monai.networks.nets import SegResNetDS
    from monai.transforms import (Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped, Invertd,
                                  LoadImaged, Orientationd, SaveImage, ScaleIntensityRanged, Spacingd)
    t_import = time.perf_counter()
    torch.manual_seed(0)
    net = SegResNetDS(spatial_dims=3, init_filters=32, in_channels=1, out_channels=a.classes,
                      blocks_down=(1, 2, 2, 4, 4), norm="INSTANCE", dsdepth=4).eval()
    pre = Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes="RAS"),
        Spacingd(keys="image", pixdim=[a.spacing] * 3, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=-1000, a_max=1000, b_min=-1, b_max=1, clip=True),
        CropForegroundd(keys="image", source_key="image", select_fn=lambda x: x > -0.99, allow_smaller=True),
        EnsureTyped(keys="image", dtype=torch.float32),
    ])
    inferer = SlidingWindowInferer(roi_size=a.roi, sw_batch_size=1, overlap=0.625, mode="gaussian")
    t1 = time.perf_counter()
    data = pre({"image": a.input})
    t2 = time.perf_counter()
    with torch.inference_mode():
        logits = inferer(data["image"][None], net)
        probs = torch.softmax(logits.float(), dim=1)[0]
    t3 = time.perf_counter()
    from monai.data import MetaTensor
    data["pred"] = MetaTensor(probs, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
    inv = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)
    data = inv(data)
    labels = torch.argmax(data["pred"], dim=0, keepdim=True).to(torch.uint8)
    t4 = time.perf_counter()
    SaveImage(output_dir=".", output_postfix="", separate_folder=False, resample=False,
              output_dtype="uint8", print_log=False, savepath_in_metadict=False)(
        MetaTensor(labels, meta=data["pred"].meta), filename=a.output.replace(".nii.gz", ""))
    t5 = time.perf_counter()
    print(json.dumps({"event": "result", "import_s": t_import - t0, "build_s": t1 - t_import, "preprocess_s": t2 - t1,
                      "inference_s": t3 - t2, "invert_argmax_s": t4 - t3, "write_s": t5 - t4,
                      "model_grid": list(probs.shape[1:]), "parameters": sum(x.numel() for x in net.parameters())}))


if __name__ == "__main__":
    main()
