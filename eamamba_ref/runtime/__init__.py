"""What runs a forward pass: the backend tables, the threads, the allocator and tracing."""
