"""Running a trained network: the :class:`~threempose.inference.predictor.Predictor` (image in,
people out), dynamic early exits (:mod:`~threempose.inference.dynamic_exit`), the optimized
deploy form (:mod:`~threempose.inference.deploy`), exit segments for other runtimes
(:mod:`~threempose.inference.segments`: the export writer and the runtime reader), runs over
folders of images (:mod:`~threempose.inference.folder_run`), exit-threshold calibration
(:mod:`~threempose.inference.calibration`) and drawing (:mod:`~threempose.inference.draw`)."""
