"""The operating system and the GPU driver: MPS, green contexts, worker processes, NVML, env."""
