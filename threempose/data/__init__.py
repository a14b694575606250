"""Data: the embedded synthetic data set, COCO keypoints, targets and augmentation."""
