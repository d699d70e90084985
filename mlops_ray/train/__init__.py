"""Ray Train: the driver (run record, TorchTrainer from typed sections, fit, summary), where a
loop runs (`session`), what makes it spot-safe (`spot`, `gate`, `resume`), the tasks it runs
(`tasks/`: tabular MLP, LM) and CV folds as training (`folds`)."""
