"""Training signals and jobs: the search (:mod:`~threempose.training.search_job`) and the training
of a derived network (:mod:`~threempose.training.train_job`), their losses
(:mod:`~threempose.training.losses`), the teacher (:mod:`~threempose.training.teacher`), the
bilevel optimizers (:mod:`~threempose.training.search_optim`) and per-epoch validation
(:mod:`~threempose.training.validate`)."""
