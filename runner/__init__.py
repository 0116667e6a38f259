"""fitrun: Ray-orchestrated LoRA fine-tuning that finds the cheapest configuration fitting your GPU."""
