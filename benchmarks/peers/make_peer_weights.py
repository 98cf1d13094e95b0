"""Random-weight stand-ins for the peer tools' models, so that their real pipelines run end to end (timing only).

Run with the peers environment's python (setup_peers.sh). Writes, under HOME (used as TOTALSEG_HOME_DIR):

  config.json                        TotalSegmentator's config with usage statistics off (nothing leaves the machine)
  nnunet/results/Dataset297_TotalSegmentator_total_3mm_1559subj/
      nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/{plans.json,dataset.json,fold_0/checkpoint_final.pth}
  nnunet/results/Dataset298_TotalSegmentator_total_6mm_1559subj/   (same layout, 6 mm)
  monai_segresnet/model.pt           Auto3DSeg SegResNetDS checkpoint ({"config", "state_dict"}) as SlicerMONAIAuto3DSeg loads it

TotalSegmentator 2.18 `--fast` runs nnU-Net task 297 and `--fastest` task 298 with trainer
nnUNetTrainer_4000epochs_NoMirroring, plans nnUNetPlans, configuration 3d_fullres, fold 0 (map_tasks_config.py). It
only downloads weights when that Dataset folder is missing, so the folders written here are used as they are.

The published plans cannot be downloaded here; they are reconstructed (see RECONSTRUCTION below, also written to
reconstruction.json) in nnU-Net v2's first plans format (UNet_class_name etc., the format of the v2.0.0 weights),
which nnunetv2's own PlansManager converts into a PlainConvUNet. The network is then built with nnunetv2's own code
(PlansManager -> trainer class's build_network_architecture, exactly what nnUNetPredictor does at inference), its
random initial weights are saved in nnU-Net's checkpoint format, and loading is checked with nnUNetPredictor.

Usage: python make_peer_weights.py HOME [--force]     prints one JSON line describing what was written
"""
import argparse
import json
import sys
from pathlib import Path

TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
PLANS = "nnUNetPlans"
CONFIG = "3d_fullres"
DATASETS = {
    "fast": {"task_id": 297, "name": "Dataset297_TotalSegmentator_total_3mm_1559subj", "spacing": 3.0},
    "fastest": {"task_id": 298, "name": "Dataset298_TotalSegmentator_total_6mm_1559subj", "spacing": 6.0},
}
PATCH = [112, 112, 128]          # plans axis order
FEATURES_BASE, FEATURES_MAX, N_STAGES = 32, 320, 6

RECONSTRUCTION = {
    "source": "facts stated for TotalSegmentator 2.18 --fast (Dataset297): 3 mm, patch 112x112x128, 6 stages, "
              "32-320 features, 117 classes + background, trainer nnUNetTrainer_4000epochs_NoMirroring; --fastest "
              "(Dataset298) at 6 mm. Everything else is nnU-Net's default 3d_fullres plan and is reconstructed.",
    "format": "nnU-Net v2 first plans format (UNet_class_name PlainConvUNet, UNet_base_num_features 32, "
              "unet_max_num_features 320), converted by nnunetv2.PlansManager into a PlainConvUNet",
    "patch_size": PATCH,
    "spacing": "[3, 3, 3] (297) / [6, 6, 6] (298)",
    "features_per_stage": [min(FEATURES_BASE * 2 ** i, FEATURES_MAX) for i in range(N_STAGES)],
    "conv_kernel_sizes": "3x3x3 in all 6 stages",
    "pool_op_kernel_sizes": "[1,1,1], then [2,2,2] x4, then [1,1,2]: nnU-Net pools an axis while the feature map "
                            "stays >= 8, so the 112 axes pool 4 times (112/16 = 7) and the 128 axis 5 times "
                            "(128/32 = 4); bottleneck 7x7x4",
    "n_conv_per_stage": "encoder 2 per stage, decoder 2 per stage",
    "norm_nonlin": "InstanceNorm3d (eps 1e-5, affine), LeakyReLU, conv bias, no dropout (nnU-Net defaults)",
    "normalization": "CTNormalization with made-up foreground intensity statistics (mean 0, std 300, "
                     "percentiles -1000/1000): only the values of the result depend on them, not the time",
    "resampling": "nnU-Net defaults: resample_data_or_seg_to_shape, order 3 for images (order_z 0 when "
                  "anisotropic), order 1 for probabilities; transpose 0,1,2; SimpleITKIO",
    "labels": "background + the 117 class names of totalsegmentator.map_to_binary.class_map['total'] (118 outputs)",
    "checkpoint": "fold_0/checkpoint_final.pth: network_weights (random init of nnunetv2's build_network_architecture, "
                  "torch.manual_seed(0)), init_args.configuration 3d_fullres, trainer_name, "
                  "inference_allowed_mirroring_axes None (NoMirroring)",
}

SEGRESNET = {
    "model": "Auto3DSeg SegResNetDS as in SlicerMONAIAuto3DSeg's 'Low Res Abdominal organs TS2 - 3mm' "
             "(class_map_part_organs: 24 organs + background)",
    "classes": 25,
    "resample_resolution": [3.0, 3.0, 3.0],
    "roi_size": [192, 192, 128],
    "intensity_bounds": [-1000.0, 1000.0],
    "network": {"_target_": "SegResNetDS", "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4], "norm": "INSTANCE",
                "in_channels": 1, "out_channels": 25, "dsdepth": 4},
}


def plans_for(name, spacing):
    conf = {
        "data_identifier": f"{PLANS}_{CONFIG}", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": PATCH, "median_image_size_in_voxels": [200, 160, 160], "spacing": [spacing] * 3,
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "UNet_class_name": "PlainConvUNet", "UNet_base_num_features": FEATURES_BASE,
        "n_conv_per_stage_encoder": [2] * N_STAGES, "n_conv_per_stage_decoder": [2] * (N_STAGES - 1),
        "num_pool_per_axis": [4, 4, 5],
        "pool_op_kernel_sizes": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 1, 2]],
        "conv_kernel_sizes": [[3, 3, 3]] * N_STAGES, "unet_max_num_features": FEATURES_MAX,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "batch_dice": False,
    }
    return {
        "dataset_name": name, "plans_name": PLANS,
        "original_median_spacing_after_transp": [spacing] * 3, "original_median_shape_after_transp": [200, 160, 160],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {CONFIG: conf}, "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3071.0, "mean": 0.0, "median": 0.0, "min": -1024.0,
            "percentile_00_5": -1000.0, "percentile_99_5": 1000.0, "std": 300.0}},
    }


def dataset_json():
    from totalsegmentator.map_to_binary import class_map
    names = list(class_map["total"].values())
    labels = {"background": 0}
    labels.update({n: i + 1 for i, n in enumerate(names)})
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz"}


def make_totalseg(home: Path, mode: str, force: bool) -> dict:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    import nnunetv2
    d = DATASETS[mode]
    folder = home / "nnunet" / "results" / d["name"] / f"{TRAINER}__{PLANS}__{CONFIG}"
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    if ckpt.exists() and not force:
        written = False
    else:
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        plans, ds = plans_for(d["name"], d["spacing"]), dataset_json()
        (folder / "plans.json").write_text(json.dumps(plans, indent=2))
        (folder / "dataset.json").write_text(json.dumps(ds, indent=2))
        pm = PlansManager(plans)
        cm = pm.get_configuration(CONFIG)
        trainer = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"),
                                              TRAINER, "nnunetv2.training.nnUNetTrainer")
        n_in = determine_num_input_channels(pm, cm, ds)
        n_out = pm.get_label_manager(ds).num_segmentation_heads
        torch.manual_seed(0)
        import inspect
        if "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters:  # nnunetv2 >= 2.6
            net = trainer.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
        else:
            net = trainer.build_network_architecture(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                                     cm.network_arch_init_kwargs_req_import, n_in, n_out,
                                                     enable_deep_supervision=False)
        torch.save({"network_weights": net.state_dict(), "init_args": {"configuration": CONFIG},
                    "trainer_name": TRAINER, "inference_allowed_mirroring_axes": None}, ckpt)
        written = True
    # Check: nnU-Net's own predictor loads it (what TotalSegmentator calls).
    pred = nnUNetPredictor(tile_step_size=0.8, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    net = pred.network
    return {"mode": mode, "task_id": d["task_id"], "folder": str(folder), "written": written,
            "network": type(net).__name__, "parameters": sum(p.numel() for p in net.parameters()),
            "outputs": pred.label_manager.num_segmentation_heads,
            "patch_size": list(pred.configuration_manager.patch_size),
            "spacing": list(pred.configuration_manager.spacing),
            "features_per_stage": pred.configuration_manager.network_arch_init_kwargs["features_per_stage"],
            "strides": pred.configuration_manager.network_arch_init_kwargs["strides"]}


def make_segresnet(home: Path, force: bool) -> dict:
    import torch
    from monai.bundle import ConfigParser
    path = home / "monai_segresnet" / "model.pt"
    config = {k: SEGRESNET[k] for k in ("resample_resolution", "roi_size", "intensity_bounds", "network")}
    config.update({"normalize_mode": "ct", "orientation_ras": True, "crop_foreground": True, "sigmoid": False,
                   "bundle_root": "abdominal-organs-3mm (random weights)"})
    torch.manual_seed(0)
    net = ConfigParser(config["network"]).get_parsed_content()
    written = False
    if force or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": config, "state_dict": net.state_dict(), "epoch": 0, "best_metric": 0.0}, path)
        written = True
    return {"path": str(path), "written": written, "network": type(net).__name__,
            "parameters": sum(p.numel() for p in net.parameters()), **{k: SEGRESNET[k] for k in
                                                                       ("model", "classes", "roi_size")}}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("home")
    p.add_argument("--force", action="store_true")
    a = p.parse_args()
    # Same as totalseg_cli.py: the Primus trainer module imports torchvision, which cannot load with CPU torch.
    import types
    primus = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"
    sys.modules.setdefault(primus, types.ModuleType(primus))
    home = Path(a.home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "config.json"
    if not cfg.exists():
        cfg.write_text(json.dumps({"totalseg_id": "totalseg_offline", "send_usage_stats": False,
                                   "prediction_counter": 0}, indent=4))
    else:  # never send statistics from a benchmark
        c = json.loads(cfg.read_text())
        if c.get("send_usage_stats"):
            c["send_usage_stats"] = False
            cfg.write_text(json.dumps(c, indent=4))
    import os
    os.environ["nnUNet_results"] = str(home / "nnunet" / "results")
    os.environ.setdefault("nnUNet_raw", os.environ["nnUNet_results"])
    os.environ.setdefault("nnUNet_preprocessed", os.environ["nnUNet_results"])
    out = {"home": str(home), "totalsegmentator": [make_totalseg(home, m, a.force) for m in DATASETS],
           "segresnet": make_segresnet(home, a.force), "reconstruction": RECONSTRUCTION}
    (home / "reconstruction.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
