"""Workers on other hosts: `pdcli node` processes join a head (`pdcli serve --dist-init-addr --nnodes`) over
authenticated TCP; their workers carry the same typed messages as local ones (pdcli/messages.py)."""
