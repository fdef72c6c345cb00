#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <time.h>
#define SZ (96u<<20)
static char *buf; static int nt;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void* rd(void*a){long id=(long)a; size_t per=SZ/nt; __m256i acc=_mm256_setzero_si256();
 for(int rep=0;rep<20;rep++){ const char*p=buf+id*per; for(size_t i=0;i<per;i+=32) acc=_mm256_add_epi32(acc,_mm256_load_si256((const __m256i*)(p+i)));}
 return (void*)(long)_mm256_extract_epi32(acc,0);}
int main(int c,char**v){nt=atoi(v[1]); buf=aligned_alloc(64,SZ); for(size_t i=0;i<SZ;i++)buf[i]=i;
 for(int trial=0;trial<3;trial++){ pthread_t th[8]; double t0=now(); for(long i=0;i<nt;i++)pthread_create(&th[i],0,rd,(void*)i); for(int i=0;i<nt;i++)pthread_join(th[i],0); double dt=now()-t0; printf("%d threads: %.1f GB/s\n",nt,20.0*SZ/dt/1e9);} }
