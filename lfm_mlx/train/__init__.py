"""Training plumbing shared by the stages that train (grouped, lora): `schedules` (which layers train
together; the one warmup + cosine learning rate), `checkpoint` (atomic checkpoints, resume state, parked
arrays), `yamlfile` (config files read strictly) and `distributed` (data parallel over `mx.distributed`)."""
