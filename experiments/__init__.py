"""The studies and benchmarks built on resnet_jax: scripts run from the repository root as
`python -m experiments.<name>` (e.g. `python -m experiments.lr_schedules --help`)."""
