"""Files in and out: checkpoints (read without executing code), configs, images, chunked TIFF."""
