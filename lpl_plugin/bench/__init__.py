"""`lpl-plugin bench`: the LPL call measured variant by variant, each in a fresh process."""
