"""What travels between the hub and its nodes: the messages of each action (built and checked at the
boundary, so what is parsed here is trusted inside) and the wire format of adapters and bases."""
