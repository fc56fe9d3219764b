"""The benchmark pipeline for real data: propose candidate triplets from a catalogue, review
them by hand in a browser, export the verified ones in the format `solar.benchmark` defines.

`python -m solar.benchmark propose | review | export` (see :mod:`solar.curation.cli`)."""
from .catalogue import Catalogue, CatalogueError, read_catalogue
from .export import export_benchmark
from .propose import Proposal, load_proposal, propose, proposal_hash
from .review import ReviewApp, make_server
from .verdicts import VerdictError, VerdictFile, cohen_kappa, merge_verdicts, read_verdicts

__all__ = ["Catalogue", "CatalogueError", "read_catalogue", "propose", "Proposal", "load_proposal", "proposal_hash",
           "ReviewApp", "make_server", "VerdictFile", "VerdictError", "read_verdicts", "merge_verdicts",
           "cohen_kappa", "export_benchmark"]
