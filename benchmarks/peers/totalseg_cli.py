"""TotalSegmentator's own command line (`TotalSegmentator ...`), started with one import made harmless.

The torchvision wheel on the package index is built against CUDA torch; with the CPU build of torch its operators
cannot load and `import torchvision` raises. nnU-Net 2.8 finds a trainer by importing every module under
nnunetv2/training/nnUNetTrainer, among them the Primus trainers (dynamic_network_architectures.primus -> timm ->
torchvision), so TotalSegmentator stops before predicting. That one module is registered as an empty module before
TotalSegmentator starts; the trainer TotalSegmentator asks for (nnUNetTrainer_4000epochs_NoMirroring) lives in
variants/ and is found as usual. Everything else is TotalSegmentator's own `main()` with the arguments given.

Usage: python totalseg_cli.py -i CT.nii.gz -o OUT.nii.gz --ml --fast -d cpu
"""
import sys
import types

_PRIMUS = "nnunetv2.training.nnUNetTrainer.primus.primus_trainers"

if __name__ == "__main__":
    sys.modules[_PRIMUS] = types.ModuleType(_PRIMUS)
    from totalsegmentator.bin.TotalSegmentator import main
    sys.argv[0] = "TotalSegmentator"
    sys.exit(main())
