"""Energy-bounded fine-tuning (Liu et al., 2020): ``python -m experiments.cifar10_energy_ft``.

Fine-tunes a pretrained workdir's newest checkpoint (weights and BatchNorm
statistics; a fresh optimizer) with cross-entropy plus 0.1 x the squared-hinge
energy margins ``relu(E_in - m_in)^2 + relu(m_out - E_out)^2`` on 128
in-distribution and 256 auxiliary outlier images per step: 10 epochs, Nesterov
SGD, lr 1e-3 cosine to 1e-6 per step. Margins: numbers (defaults -23 / -5 on
CIFAR-10, -27 / -5 on CIFAR-100), or ``auto``: the initial model's mean energy
on in-distribution / outlier training data, recorded in ``config.json`` and the
report::

    python -m experiments.cifar10_energy_ft --workdir runs/energy --init_from runs/ce \\
        --preset cpu --data local --m_in auto --m_out auto
"""

import sys

from experiments.train import main

if __name__ == "__main__":
    main(sys.argv[1:], method="energy_ft")
