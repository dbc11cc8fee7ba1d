# The plans of verify-gpu.sh's `formats` stage and of scripts/formats-cpu.sh (its CPU side), and the
# prompt: one setting of each format (window 0 where it has one, so generation reads compressed blocks).
GEN_PLANS=(
  "fp16"
  "kivi:bits=4,window=0"
  "kivi:bits=2,window=0"
  "asymkv:lk=30,lv=15,hi=4,lo=2,group=32,window=0"
  "decoquant:bits=4,chunk=256"
  "qjl:m=256,m0=256,buffer=0"
  "rvq:codes=256,depth=8,window=0,codebooks=data/rvq-lcet10-256x8.safetensors"
)
PPL_PLANS=(
  "asymkv:lk=30,lv=15,hi=4,lo=2,group=32,window=0"
  "asymkv:lk=30,lv=0,hi=4,lo=2,group=32,window=128"
)
# About 500 tokens of Alice (bytes 20000-22000 of the Canterbury corpus file).
PROMPT=$(head -c 22000 data/corpus/alice29.txt | tail -c 2000)
