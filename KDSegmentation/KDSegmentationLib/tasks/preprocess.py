"""Transitional names: the CT steps live in tasks/ct.py, the photo steps in tasks/retina.py."""
from KDSegmentationLib.tasks.ct import (PreparedVolume, ct_window, labels_on_input_grid, prepare_ct_label,  # noqa: F401
                                        prepare_ct_volume)
from KDSegmentationLib.tasks.retina import (PreparedPhoto, fundus_input, prepare_fundus,  # noqa: F401
                                            prepare_fundus_label, probabilities_to_photo)
