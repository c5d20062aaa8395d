"""Training plumbing shared by the stages that train (grouped, lora): `schedules` (which layers train
together; the one warmup + cosine learning rate), `checkpoint` (atomic checkpoints, resume state, parked
arrays) and `yamlfile` (config files read strictly)."""
