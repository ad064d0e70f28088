"""KL autoencoders: the frozen VAE the latent diffusion family encodes images with."""
