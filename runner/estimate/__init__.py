"""`fitrun estimate`: peak memory from a fake-tensor trace on the CPU (`trace`)."""
