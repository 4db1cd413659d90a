"""Provider connections: the credentials and endpoints a workspace's agents call models through."""
