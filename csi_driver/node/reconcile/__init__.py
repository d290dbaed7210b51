"""Node-side reconcilers: each makes this node match the records assigned to it."""
