"""After the run: the adapter a job wrote, loaded onto its base (`load`), tried on a prompt (`generate`), and
merged into a plain Transformers model for servers that do not load LoRA adapters (`export`)."""
