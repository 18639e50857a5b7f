# The image of rayjob.yaml: Ray's image for the Ray and Python this project pins, with moegrok
# (and your data/ files) at /home/ray/moegrok and its GPU engine installed.
#   docker build -t <registry>/moegrok:0.1.0 . && docker push <registry>/moegrok:0.1.0
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /home/ray/moegrok
RUN pip install --no-cache-dir -e "/home/ray/moegrok[gpu]"
