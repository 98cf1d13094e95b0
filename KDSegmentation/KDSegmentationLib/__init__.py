"""KDSegmentationLib: the Slicer-free engine of the KDSegmentation extension.

Nothing in this package imports slicer, qt, ctk or vtk. Heavy packages (torch, MONAI, SimpleITK) are imported lazily
by the modules that need them so that the command line starts fast.
"""
__version__ = "0.1.0"
