"""Converters from public raw downloads into nnU-Net raw format plus ssl_split.json.

Every converter (``flare22.py``, ``acdc.py``, ...) only knows its dataset's raw layout: it builds a
:class:`~dataset_conversion.roles.Catalogue` of :class:`~dataset_conversion.cases.Case` objects (where each image and
label comes from, which patient it belongs to) and a :class:`~dataset_conversion.roles.DatasetRules` (label dict,
channel names, published splits). Everything else is written once, one module per concern:

- ``errors``: :class:`ConversionError`, the one error type, whose message names the file or option;
- ``raw_files``: list raw files (also inside ``.zip`` archives), match them by name, pair images with labels;
- ``readers``: turn a raw file into a SimpleITK image, decoded completely (a truncated file is an error);
- ``cases``: a case, the dataset format, and the checks of images and label maps (labels are never resampled);
- ``writing``: the role folders, writing cases in parallel, dataset.json;
- ``roles``: split options, catalogue and rules, published lists, the labeled / unlabeled / test / val choice;
- ``dataset``: the output-folder checks and the atomic conversion of a whole dataset;
- ``command``: how ``nnssl_convert`` (``cli``) exposes a converter as a sub-command.

``add_unlabeled`` (``nnssl_add_unlabeled``) adds extra unlabeled images to a converted dataset.
"""
