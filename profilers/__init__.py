"""Energy profilers: NVML (GPU), RAPL (CPU), CodeCarbon (CO2 and estimates), windows and a sampler."""
