"""attenuation: CNN filter pruning by filter attenuation."""
