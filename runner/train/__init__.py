"""`fitrun train`: the driver (`driver`, runs where the CLI runs), the Ray Train worker (`worker`, on each
GPU or CPU worker), its checkpoint state (`state`) and its console lines (`console`)."""
