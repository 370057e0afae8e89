"""Protocol buffers of the booking service and its demo upstreams, with generated code."""
