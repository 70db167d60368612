"""Building blocks of `ddn_dist.checkpoint`: completion markers, collectives, universal conversion,
the S3 mirror and fp32 weight export."""
